// Command wschat is a chat room for everyone on your network, in one file
// that reads in the order data flows: connect, join, read, broadcast, write,
// drop. Where a comment says "x/net:", it is about that library's ways, not
// about WebSockets.
package main

import (
	"bufio"
	"bytes"
	"crypto/rand"
	_ "embed"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/websocket"
)

//go:embed index.html
var indexHTML []byte

const (
	maxMessageBytes = 4096        // a larger frame closes the sender's connection
	maxFrameBytes   = 16 << 10    // events share a frame up to this; a larger one goes alone
	historySize     = 100         // messages kept for newcomers
	closeGrace      = time.Second // after a drop, for the last writes and the close frame
	watchEvery      = time.Second // how often the room's clock looks at every client
)

// limits are a room's rules; tests lower them on their own room.
type limits struct {
	queueLimit    int           // events waiting for one client; one more and it is too slow
	pingAfter     time.Duration // nothing heard from a client for this long: ping it
	dropAfter     time.Duration // nothing heard for this long, not even a pong: it is gone
	floodBurst    int           // messages a client may send at once...
	floodInterval time.Duration // ...and then one per interval
	headerTimeout time.Duration // for a request's headers to come in
}

var defaultLimits = limits{queueLimit: 4096, pingAfter: 30 * time.Second, dropAfter: time.Minute,
	floodBurst: 20, floodInterval: time.Second / 10, headerTimeout: 10 * time.Second}

func main() {
	addr := flag.String("addr", ":8080", "`host:port` to listen on; :0 picks a free port")
	hosts := flag.String("host", "", "other `names` of this server, comma-separated, for the chat to accept")
	flag.Parse()
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "wschat:", err)
		os.Exit(1)
	}
	printURLs(os.Stdout, ln.Addr().(*net.TCPAddr))

	r := newRoom(strings.Fields(strings.ReplaceAll(*hosts, ",", " "))...)
	srv := r.server()
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, os.Interrupt, syscall.SIGTERM)
	go func() { <-stop; signal.Stop(stop); srv.Close() }() // a second Ctrl-C kills at once
	if err := srv.Serve(ln); err != http.ErrServerClosed {
		log.Fatal(err)
	}
	log.Print("shutting down")
	r.shutdown() // x/net: it hijacked the WebSockets from net/http, so srv.Close leaves them
}

// printURLs says where to point a browser: here, then each LAN address.
func printURLs(w io.Writer, addr *net.TCPAddr) {
	fmt.Fprintln(w, "wschat is running. Open it in a browser:")
	if !addr.IP.IsUnspecified() {
		fmt.Fprintf(w, "  http://%s\n", addr)
		return
	}
	fmt.Fprintf(w, "  http://localhost:%d\n", addr.Port)
	ifaceAddrs, _ := net.InterfaceAddrs() // on error, localhost has to do
	for _, a := range ifaceAddrs {
		if ipnet, ok := a.(*net.IPNet); ok && ipnet.IP.To4() != nil && !ipnet.IP.IsLoopback() {
			fmt.Fprintf(w, "  http://%s:%d\n", ipnet.IP, addr.Port)
		}
	}
}

// An event is what the server sends: hello, join, leave or msg.
type event struct {
	Type    string `json:"type"`
	ID      int    `json:"id,omitempty"` // msg: 1, 2, 3… in each run of the server
	UID     int    `json:"uid"`
	Online  int    `json:"online,omitempty"`
	Msg     string `json:"msg,omitempty"`
	Run     string `json:"run,omitempty"`     // hello: new each time the server starts
	History int    `json:"history,omitempty"` // hello: this many msg events follow
}

// encode makes ev one line of JSON: lines separate events in a frame (JSON
// escapes a newline inside a string). HTML is not escaped (the page shows
// text, never HTML), but control characters are: a 4096-byte message of them
// takes 24 KB, the largest event, which goes alone in its frame.
func encode(ev event) []byte {
	var line bytes.Buffer
	enc := json.NewEncoder(&line)
	enc.SetEscapeHTML(false)
	enc.Encode(ev) // cannot fail on strings and ints
	return bytes.TrimSuffix(line.Bytes(), []byte("\n"))
}

// A room is the set of connected clients. The lock rule: r.mu guards the
// fields below it, and each client's leftBecause; c.mu guards the fields below
// it. Whoever needs both takes r.mu first, so they cannot deadlock. No lock is
// held across a network write or a log line: either can block.
type room struct {
	limits
	logf  func(format string, args ...any)
	hosts map[string]bool // names the chat answers to, besides IP addresses
	run   string          // lets a page that reconnects tell that the server restarted

	mu                 sync.Mutex
	clients            map[*client]bool
	lastUID, lastMsgID int
	history            [][]byte       // the last historySize msg events, oldest first
	closing            bool           // shutting down: nobody may join
	conns              sync.WaitGroup // joined connections not yet closed (see join)
}

// newRoom makes a room that answers to these names too, and starts its clock.
func newRoom(names ...string) *room {
	r := &room{limits: defaultLimits, logf: log.Printf, run: rand.Text(), clients: make(map[*client]bool)}
	hostname, _ := os.Hostname()
	hostname = strings.TrimSuffix(strings.ToLower(hostname), ".local") // as macOS may give it
	r.hosts = map[string]bool{"localhost": true, hostname: true, hostname + ".local": true}
	for _, name := range names {
		r.hosts[strings.ToLower(name)] = true
	}
	go func() {
		for now := range time.Tick(watchEvery) {
			if !r.checkClients(now) {
				return
			}
		}
	}()
	return r
}

// A client is one connection: serveClient reads from it, its writer writes.
type client struct {
	uid         int
	conn        *wsConn
	wake        chan struct{} // one slot: "there is something to send"; closed by the drop
	leftBecause string        // set by the drop
	pingedAt    time.Time     // the clock's last ping (guarded by r.mu)

	mu      sync.Mutex
	queue   [][]byte // encoded events the writer has not taken yet
	pingDue bool     // the room's clock asks the writer for a ping
}

// server serves the page and the chat. A request's headers must be in
// within headerTimeout, or a client sending a byte at a time holds a
// connection forever.
func (r *room) server() *http.Server {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Write(indexHTML)
	})
	mux.HandleFunc("GET /ws", func(w http.ResponseWriter, req *http.Request) {
		upgrade(w, req, r.checkHandshake, r.serveClient)
	})
	return &http.Server{Handler: mux, ReadHeaderTimeout: r.headerTimeout}
}

// checkHandshake sees each upgrade request first; an error makes a 403. It
// refuses other sites: Origin, if sent, must name the Host, and Host must be
// an IP address or ours, against DNS rebinding (README, Abuse and limits).
func (r *room) checkHandshake(req *http.Request) error {
	host := (&url.URL{Host: req.Host}).Hostname() // no port, no brackets
	if net.ParseIP(host) == nil && !r.hosts[strings.ToLower(host)] {
		r.logf("refused a WebSocket for Host %q: if that is this server, run it with -host %s", req.Host, host)
		return errors.New("not this server")
	}
	if origin := req.Header.Get("Origin"); origin != "" { // none: not a browser
		if u, err := url.Parse(origin); err != nil || !strings.EqualFold(u.Host, req.Host) {
			return errors.New("another site")
		}
	}
	return nil
}

// serveClient is one connection's whole life. x/net: it calls this after the
// handshake and closes TCP when it returns, so we wait for the writer first.
func (r *room) serveClient(conn *wsConn) {
	c, online := r.join(conn)
	if c == nil { // shutting down: a close frame, and that is all
		conn.Close()
		return
	}
	defer r.conns.Done() // join did the Add
	var writer sync.WaitGroup
	writer.Go(func() { r.writeQueue(c) })
	r.logf("user %d joined from %s (%d online)", c.uid, conn.Request().RemoteAddr, online)

	reason := r.readMessages(c)
	// If the room dropped c first, this does nothing, and its reason stands
	// (the read then failed only because of the drop's deadline).
	r.mu.Lock()
	r.dropLocked(c, reason)
	reason = c.leftBecause
	r.mu.Unlock()
	writer.Wait()
	conn.Close() // within the drop's deadline, or only TCP is closed
	r.logf("user %d left: %s", c.uid, reason)
}

// join gives the connection the next user id, a queue that starts with hello
// and the history, and tells everyone else; or returns nil, if shutting down.
// All under the lock every broadcast takes, so the live stream starts
// exactly where the history ends. The Add is under it too, so that
// shutdown's Wait, which comes after closing is set, never races an Add.
func (r *room) join(conn *wsConn) (c *client, online int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closing {
		return nil, 0
	}
	r.conns.Add(1)
	r.lastUID++
	online = len(r.clients) + 1
	hello := encode(event{Type: "hello", UID: r.lastUID, Online: online, Run: r.run, History: len(r.history)})
	c = &client{uid: r.lastUID, conn: conn, wake: make(chan struct{}, 1),
		queue: append([][]byte{hello}, r.history...)}
	c.wakeWriter()
	r.clients[c] = true
	r.broadcastLocked(encode(event{Type: "join", UID: c.uid, Online: online}), c)
	return c, online
}

// readMessages relays the client's messages until a read fails, and says
// why. x/net: Receive returns a frame, not a message, and answers pings
// itself (so a pong waits while this loop does).
//
// Flood control is a token bucket kept as one time, nextRead: no frame is
// read before it, and each frame read, empty or not, moves it one interval
// on. Time spent waiting for the client saves up (earliest is taken after
// Receive), but no more than floodBurst-1 intervals. So with the defaults a
// quiet client's frames 1 to 20 are read at once, 21 at +0.1 s, 22 at +0.2 s.
// Meanwhile nothing is read: TCP holds the client back.
func (r *room) readMessages(c *client) (reason string) {
	var nextRead time.Time
	for {
		time.Sleep(time.Until(nextRead)) // at most one interval: each frame moves nextRead by one
		var text string
		err := textMessage.Receive(c.conn.Conn, &text)
		earliest := time.Now().Add(-time.Duration(r.floodBurst-1) * r.floodInterval)
		if nextRead.Before(earliest) {
			nextRead = earliest
		}
		nextRead = nextRead.Add(r.floodInterval)
		if errors.Is(err, io.EOF) {
			return "closed the connection"
		} else if err != nil { // too large (MaxPayloadBytes), binary (textMessage), a drop, a network error
			return err.Error()
		}
		if text = strings.TrimSpace(text); text != "" {
			r.broadcastMessage(c, text)
		}
	}
}

// broadcastMessage sends a message to everyone, its sender too, and keeps it
// for newcomers; unless the room dropped the sender during the read.
func (r *room) broadcastMessage(from *client, text string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.clients[from] {
		return
	}
	r.lastMsgID++
	ev := encode(event{Type: "msg", ID: r.lastMsgID, UID: from.uid, Msg: text})
	if r.history = append(r.history, ev); len(r.history) > historySize {
		r.history = r.history[1:]
	}
	r.broadcastLocked(ev, nil)
}

// broadcastLocked queues ev for every client but skip. Holding r.mu while ev
// goes into every queue gives everyone the same order. A client whose queue
// is full is dropped after the loop: its leave, queued mid-loop, would reach
// some clients before ev and others after it.
func (r *room) broadcastLocked(ev []byte, skip *client) {
	var tooSlow []*client
	for c := range r.clients {
		if c != skip && !r.enqueue(c, ev) {
			tooSlow = append(tooSlow, c)
		}
	}
	for _, c := range tooSlow {
		r.dropLocked(c, fmt.Sprintf("too slow: %d events waiting", r.queueLimit))
	}
}

// enqueue queues ev for c and wakes c's writer, or reports false if the queue
// is full. r.mu must be held (see wakeWriter).
func (r *room) enqueue(c *client, ev []byte) bool {
	c.mu.Lock()
	full := len(c.queue) >= r.queueLimit
	if !full {
		c.queue = append(c.queue, ev)
	}
	c.mu.Unlock()
	c.wakeWriter()
	return !full
}

// wakeWriter fills c.wake's slot, if empty. r.mu must be held: a drop closes
// wake under it, and a send on a closed channel would panic.
func (c *client) wakeWriter() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// writeQueue is the client's writer. Woken, it sends the ping the clock
// asked for, then what is queued, as many events per frame as fit in
// maxFrameBytes; it ends once wake is closed and all is sent, or a write fails.
func (r *room) writeQueue(c *client) {
	for range c.wake { // once closed, wake still hands over a pending wake: the queue is sent
		runtime.Gosched() // only for speed: broadcasts under way queue more, frames are fuller
		for {
			ping, batch := c.nextBatch()
			var err error
			if ping {
				err = pingFrame.Send(c.conn.Conn, nil)
			} else if len(batch) > 0 {
				// x/net: one Write is one text frame.
				_, err = c.conn.Write(bytes.Join(batch, []byte("\n")))
			} else {
				break // all sent: wait to be woken
			}
			if err != nil {
				r.mu.Lock()
				r.dropLocked(c, "write failed: "+err.Error())
				r.mu.Unlock()
				return
			}
		}
	}
}

// nextBatch reports a ping the clock asked for, ahead of the queue: a client
// that reads slowly through a long queue still answers it in time. Otherwise
// it takes the queued events that fit in maxFrameBytes, at least one however
// large; the rest stay queued, in order.
func (c *client) nextBatch() (ping bool, batch [][]byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pingDue {
		c.pingDue = false
		return true, nil
	}
	n, size := 0, 0
	for n < len(c.queue) && (n == 0 || size+len(c.queue[n]) <= maxFrameBytes) {
		size += len(c.queue[n]) + 1 // and a newline
		n++
	}
	if batch, c.queue = c.queue[:n], c.queue[n:]; len(c.queue) == 0 {
		c.queue = nil // so the memory of the events sent can go
	}
	return false, batch
}

// checkClients is the room's clock. A client not heard from for pingAfter
// gets a ping, one each pingAfter; one not heard from for dropAfter, not even
// a pong, is gone: it stopped reading, or vanished. It reports false once the
// room is shutting down.
func (r *room) checkClients(now time.Time) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	var silent []*client
	for c := range r.clients {
		quiet := now.Sub(c.conn.lastHeard())
		if quiet >= r.dropAfter {
			silent = append(silent, c)
		} else if quiet >= r.pingAfter && now.Sub(c.pingedAt) >= r.pingAfter {
			c.pingedAt = now
			c.mu.Lock()
			c.pingDue = true
			c.mu.Unlock()
			c.wakeWriter()
		}
	}
	for _, c := range silent { // not in the loop: a drop takes every client's lock
		r.dropLocked(c, fmt.Sprintf("no answer to pings for %.0f s", r.dropAfter.Seconds()))
	}
	return !r.closing
}

// dropLocked takes c out of the room and tells everyone left. Whoever gives
// up on c first calls it: serveClient, the writer, broadcastLocked, the clock
// or shutdown; later calls do nothing. Its leave may fill other queues, and
// drop those clients too.
//
// It ends c's goroutines with the only deadlines the connection ever gets:
// reads end now, and what is still to write (the queue, a pong, the close
// frame) gets closeGrace. Not with Close: x/net's Close waits for its write
// lock, so it would hang behind a blocked write. And none before: x/net
// writes pongs inside Receive under whatever deadline is set, so one left by
// an old write would fail them (and one per write costs two timer changes).
func (r *room) dropLocked(c *client, reason string) {
	if !r.clients[c] {
		return
	}
	delete(r.clients, c)
	c.leftBecause = reason
	c.conn.SetReadDeadline(time.Now())
	c.conn.SetWriteDeadline(time.Now().Add(closeGrace))
	close(c.wake) // the writer ends once the queue is sent
	if !r.closing {
		r.broadcastLocked(encode(event{Type: "leave", UID: c.uid, Online: len(r.clients)}), nil)
	}
}

// shutdown drops everyone, with no leave, and returns once every connection
// is closed: within closeGrace, or one flood interval for a paused reader.
func (r *room) shutdown() {
	r.mu.Lock()
	r.closing = true
	for c := range r.clients {
		r.dropLocked(c, "server shutting down")
	}
	r.mu.Unlock()
	r.conns.Wait()
}

// textMessage is websocket.Message for strings, but refuses binary frames.
var textMessage = websocket.Codec{Unmarshal: func(data []byte, payloadType byte, v any) error {
	if payloadType != websocket.TextFrame {
		return errors.New("sent a binary frame")
	}
	*v.(*string) = string(data)
	return nil
}}

// pingFrame sends a ping: x/net has no call for it, but a Codec may choose
// the frame type.
var pingFrame = websocket.Codec{Marshal: func(any) ([]byte, byte, error) {
	return nil, websocket.PingFrame, nil
}}

// A wsConn is a WebSocket connection that knows when its client was last
// heard from. x/net reads a pong inside Receive and drops it, so we cannot see
// one; but every byte it reads comes through the *bufio.Reader it is handed
// with the connection, and upgrade hands it one that reads through Read.
type wsConn struct {
	*websocket.Conn
	r     io.Reader    // the connection, for Read
	heard atomic.Int64 // when a byte last arrived, as time since started
}

var started = time.Now() // a time.Time cannot be atomic; time since this keeps the monotonic clock

func (c *wsConn) hear()                { c.heard.Store(int64(time.Since(started))) }
func (c *wsConn) lastHeard() time.Time { return started.Add(time.Duration(c.heard.Load())) }

func (c *wsConn) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if n > 0 {
		c.hear()
	}
	return n, err
}

// upgrade takes the connection from net/http (Hijack), and serves it as a
// WebSocket, if check allows it, in a goroutine of its own: so net/http's
// goroutine for the request, and its buffers, go at once. x/net: not
// websocket.Handler, which refuses clients without Origin; and every
// subprotocol is declined (x/net would echo one, and refuse two).
func upgrade(w http.ResponseWriter, req *http.Request, check func(*http.Request) error, serve func(*wsConn)) {
	netConn, rw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return // cannot happen: an HTTP/1 connection
	}
	early, _ := rw.Reader.Peek(rw.Reader.Buffered()) // what the client sent behind the request
	conn := &wsConn{r: io.MultiReader(bytes.NewReader(bytes.Clone(early)), netConn)}
	conn.hear()
	taken := hijacked{netConn, bufio.NewReadWriter(bufio.NewReaderSize(conn, 512), rw.Writer)}
	go websocket.Server{
		Handshake: func(config *websocket.Config, req *http.Request) error {
			config.Protocol = nil
			return check(req)
		},
		Handler: func(ws *websocket.Conn) {
			ws.MaxPayloadBytes = maxMessageBytes // x/net's default is 32 MB
			conn.Conn = ws
			serve(conn)
		},
	}.ServeHTTP(taken, req)
}

// hijacked is a connection taken from net/http, as x/net takes it: by
// calling Hijack on the http.ResponseWriter it is given.
type hijacked struct {
	net.Conn
	rw *bufio.ReadWriter
}

func (h hijacked) Header() http.Header                          { return nil }
func (h hijacked) WriteHeader(int)                              {}
func (h hijacked) Hijack() (net.Conn, *bufio.ReadWriter, error) { return h.Conn, h.rw, nil }
