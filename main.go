// Command wschat is a chat room for everyone on your network, and a lesson
// in how a real-time server is built, in three parts; stop after any. Part 1
// is the chat; part 2, what the network does to it; part 3, what
// golang.org/x/net/websocket leaves to us.
package main

import (
	"bufio"
	"bytes"
	"context"
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

// ---- Part 1: the chat ----
//
// A WebSocket starts as an HTTP request, GET /ws with "Upgrade: websocket",
// answered with 101 Switching Protocols; then the TCP connection carries
// frames both ways, whenever either side likes. A client's text frame is a
// chat message; the server's carry events, one JSON object per line. A ping
// asks "still there?", a pong answers, and a close frame ends the connection.
//
// Each connection has two goroutines. Its reader puts each message it reads
// into every client's queue, under the room's lock, so that all get the same
// order; its writer sends its own queue, so a slow client delays only itself.

//go:embed index.html
var indexHTML []byte // the page; main, which serves it and the chat, is in part 2

// An event is what the server sends: hello, join, leave or msg.
type event struct {
	Type    string `json:"type"`
	ID      int    `json:"id,omitempty"` // msg: 1, 2, 3… in each run of the server
	UID     int    `json:"uid"`
	Online  int    `json:"online,omitempty"`
	Msg     string `json:"msg,omitempty"`
	Run     string `json:"run,omitempty"`     // hello: new each time the server starts
	History int    `json:"history,omitempty"` // hello: this many msg events follow
	At      int64  `json:"at,omitempty"`      // msg: when the server relayed it, in Unix milliseconds
}

// encode makes ev one line of JSON, with HTML unescaped: the page shows text.
func encode(ev event) []byte {
	var line bytes.Buffer
	enc := json.NewEncoder(&line)
	enc.SetEscapeHTML(false)
	enc.Encode(ev) // cannot fail on strings and ints
	return bytes.TrimSuffix(line.Bytes(), []byte("\n"))
}

// A room is everyone connected, and the last messages. Locks: room.mu guards
// the fields below it, and each client's leftBecause, pingedAt and wake;
// client.mu, its queue. room.mu comes first; no I/O, not even a log, under either.
type room struct {
	limits                                  // the rules of part 2
	logf   func(format string, args ...any) // log.Printf; tests narrate
	hosts  map[string]bool                  // the names this server answers to
	run    string                           // new at every start (see hello)

	mu                 sync.Mutex
	clients            map[*client]bool
	lastUID, lastMsgID int
	history            [][]byte       // the last historySize msg events, oldest first
	closing            bool           // shutting down: nobody may join
	conns              sync.WaitGroup // joined connections not yet closed
}

// A client is one connection in the room.
type client struct {
	uid         int
	conn        *wsConn       // the WebSocket: receiveText, sendText, ping, cutOff, close (part 3)
	wake        chan struct{} // tells the writer there is something to send
	leftBecause string        // why the client left: the first reason given
	pingedAt    time.Time     // when the room's clock last asked for a ping
	pingDue     atomic.Bool   // the clock asks the writer to send a ping

	mu    sync.Mutex
	queue [][]byte // events the writer has not taken yet
}

// newRoom makes a room that answers to these names too, and starts its clock.
func newRoom(names ...string) *room {
	r := &room{limits: defaultLimits, logf: log.Printf, hosts: ourNames(names), run: rand.Text(), clients: map[*client]bool{}}
	go r.runClock() // part 2: a client that vanishes
	return r
}

// server serves the page at / and the chat at /ws. upgrade takes a /ws
// request's TCP connection from net/http and starts a goroutine, the client's
// reader, which answers 101 and runs serveClient (part 3 says why a new one).
func (r *room) server() *http.Server {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Write(indexHTML)
	})
	mux.HandleFunc("GET /ws", func(w http.ResponseWriter, req *http.Request) {
		upgrade(w, req, r.checkOrigin, r.serveClient)
	})
	return &http.Server{Handler: mux, ReadHeaderTimeout: r.headerTimeout}
}

// serveClient is one connection's life, on its reader: join, start the
// writer, read until the client goes, leave, wait for the writer to send
// what is left, and close the connection with a close frame.
func (r *room) serveClient(conn *wsConn) {
	c, online := r.join(conn)
	if c == nil { // shutting down
		conn.close()
		return
	}
	defer r.conns.Done() // join did the Add
	var writer sync.WaitGroup
	writer.Go(func() { r.writeEvents(c) })
	r.logf("user %d joined from %s (%d online)", c.uid, conn.remoteAddr, online)
	reason := r.drop(c, r.readMessages(c))
	writer.Wait()
	conn.close()
	r.logf("user %d left: %s", c.uid, reason)
}

// join gives the connection the next user id and a queue that starts with
// hello and the history, and tells everyone else (nil: shutting down). It
// holds the lock every broadcast takes: no message slips in between.
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
	c = &client{uid: r.lastUID, conn: conn, wake: make(chan struct{}, 1), queue: append([][]byte{hello}, r.history...)}
	c.wakeWriter()
	r.clients[c] = true
	r.broadcastLocked(encode(event{Type: "join", UID: c.uid, Online: online}), c)
	return c, online
}

// readMessages relays the client's messages until a read fails, and returns why.
func (r *room) readMessages(c *client) (reason string) {
	var bucketFullAt time.Time // for flood control
	for {
		text, err := c.conn.receiveText()
		if err != nil {
			return err.Error()
		}
		if text = strings.TrimSpace(text); text != "" {
			r.broadcastMessage(c, text)
		}
		r.limitFlood(&bucketFullAt) // waits, if the client sends too fast
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
	ev := encode(event{Type: "msg", ID: r.lastMsgID, UID: from.uid, Msg: text, At: time.Now().UnixMilli()})
	if r.history = append(r.history, ev); len(r.history) > historySize {
		r.history = r.history[1:]
	}
	r.broadcastLocked(ev, nil)
}

// broadcastLocked puts ev into every client's queue, except skip's, and
// wakes their writers; r.mu is held, so all get one order. A client with
// queueLimit events waiting is dropped after the loop: within it, its leave
// would go after ev to the clients already done, and before ev to the rest.
func (r *room) broadcastLocked(ev []byte, skip *client) {
	var tooSlow []*client
	for c := range r.clients {
		if c == skip {
			continue
		}
		c.mu.Lock()
		if len(c.queue) < r.queueLimit {
			c.queue = append(c.queue, ev)
		} else {
			tooSlow = append(tooSlow, c)
		}
		c.mu.Unlock()
		c.wakeWriter()
	}
	for _, c := range tooSlow {
		r.dropLocked(c, fmt.Sprintf("too slow: %d events waiting", r.queueLimit))
	}
}

// wakeWriter tells c's writer there is something to send. wake buffers one
// signal: enough, as a woken writer empties the whole queue. r.mu must be
// held: a drop closes wake under it, and a send on a closed channel panics.
func (c *client) wakeWriter() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// writeEvents is c's writer. Woken, it sends a ping if the room's clock
// asked for one, then all that is queued, several events to a frame. It ends
// when a write fails, or once a drop closed wake and the queue is empty.
func (r *room) writeEvents(c *client) {
	for range c.wake { // after close, range still delivers a signal left in wake
		runtime.Gosched() // not for correctness: broadcasts under way add to the queue, frames get fuller
		for {
			var err error
			if c.pingDue.Swap(false) {
				err = c.conn.ping()
			} else if events := c.takeQueue(); len(events) > 0 { // up to 16 KiB (part 2)
				err = c.conn.sendText(bytes.Join(events, []byte("\n")))
			} else {
				break // all sent: wait to be woken
			}
			if err != nil {
				r.drop(c, "write failed: "+err.Error())
				return
			}
		}
	}
}

// drop, or dropLocked with r.mu held, takes c out of the room and tells
// everyone left. Whoever gives up on c first calls it (reader, writer, a
// broadcast, the clock, shutdown); later calls change nothing, and drop
// returns the first reason. It ends c's goroutines the way Go cancels a
// blocked read or write, with deadlines: a read deadline of now fails the
// reader's read at once; a write deadline closeGrace away lets the writer
// send what is queued, and the close frame, to a client that still reads.
func (r *room) drop(c *client, reason string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.dropLocked(c, reason)
	return c.leftBecause
}

func (r *room) dropLocked(c *client, reason string) {
	if !r.clients[c] {
		return
	}
	delete(r.clients, c)
	c.leftBecause = reason
	c.conn.cutOff(closeGrace)
	close(c.wake) // the writer ends once it has sent the queue
	if !r.closing {
		r.broadcastLocked(encode(event{Type: "leave", UID: c.uid, Online: len(r.clients)}), nil)
	}
}

// ---- Part 2: what the network does to the chat ----
//
// Each story is something a LAN does to part 1, and the rule in limits for it.
type limits struct { // tests lower them on their own room
	queueLimit    int           // events waiting for a client; one more and it is too slow
	pingAfter     time.Duration // nothing heard from a client for this long: ping it
	dropAfter     time.Duration // nothing heard for this long, not even a pong: it is gone
	floodBurst    int           // messages a client may send at once...
	floodInterval time.Duration // ...and then one per interval
	headerTimeout time.Duration // for a request's headers to come in
}

var defaultLimits = limits{queueLimit: 4096, pingAfter: 30 * time.Second, dropAfter: time.Minute,
	floodBurst: 20, floodInterval: time.Second / 10, headerTimeout: 10 * time.Second}

const (
	historySize     = 100         // messages kept for newcomers
	maxMessageBytes = 4096        // a larger frame closes the sender's connection
	maxFrameBytes   = 16 << 10    // events share a frame up to this size; a larger one goes alone
	closeGrace      = time.Second // after a drop, for the last writes and the close frame
)

// A client too slow to read. A phone's screen turns off and its browser stops
// reading: TCP's buffers fill, its writer blocks, and what the room says waits
// in its queue, until broadcastLocked drops it at queueLimit events. Reading
// again in time, it catches up in frames of up to maxFrameBytes (takeQueue).
func (c *client) takeQueue() (events [][]byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	n, size := 0, 0
	for n < len(c.queue) && (n == 0 || size+len(c.queue[n]) <= maxFrameBytes) {
		size += len(c.queue[n]) + 1 // and the newline after it
		n++
	}
	if events, c.queue = c.queue[:n], c.queue[n:]; len(c.queue) == 0 {
		c.queue = nil // so that the memory of the events sent can go
	}
	return events
}

// A client that vanishes. A phone walks out of the Wi-Fi: no close frame, no
// TCP reset, just silence, which TCP would retry for a quarter of an hour. So
// a client not heard from for pingAfter (not a byte) gets a ping, which every
// WebSocket client answers; one not heard from for dropAfter is gone. One that
// reads, even slowly, answers (the ping goes first); one that stops does not.
func (r *room) runClock() {
	for now := range time.Tick(time.Second) {
		if !r.checkClients(now) {
			return // shutting down
		}
	}
}

// checkClients asks for one ping per pingAfter from each client silent that
// long, and drops those silent for dropAfter. Tests call it at made-up times.
func (r *room) checkClients(now time.Time) (running bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for c := range r.clients {
		switch quiet := now.Sub(c.conn.lastHeard()); {
		case quiet >= r.dropAfter:
			r.dropLocked(c, fmt.Sprintf("heard nothing for %.0f s", r.dropAfter.Seconds()))
		case quiet >= r.pingAfter && now.Sub(c.pingedAt) >= r.pingAfter:
			c.pingedAt = now
			c.pingDue.Store(true)
			c.wakeWriter()
		}
	}
	return !r.closing
}

// A client that floods. A bot sends a thousand messages at once, which would
// bury the conversation. So each client has a bucket of floodBurst tokens,
// refilled by one every floodInterval; each frame read takes one, and with
// none left the reader waits (TCP holds the client back: nothing is lost).
// A person's burst finds it full. It is kept as one time, fullAt: when it
// will be full again; tokens left = floodBurst - (fullAt-now)/floodInterval.
// With the defaults, a quiet client's frames 1 to 20 each move fullAt 0.1 s
// on, to now+2 s; after frame 20 the reader sleeps 0.1 s, until one is left.
func (r *room) limitFlood(fullAt *time.Time) {
	if now := time.Now(); fullAt.Before(now) {
		*fullAt = now // a full bucket gets no fuller
	}
	*fullAt = fullAt.Add(r.floodInterval)
	time.Sleep(time.Until(*fullAt) - time.Duration(r.floodBurst-1)*r.floodInterval) // until 1 token is left
}

// A page from another site. Any page you open could chat here in your name:
// your browser can reach this server. The browser sends the page's site as
// Origin, and checkOrigin refuses one that is not the Host asked for. A page
// can also point its own name at your LAN address (DNS rebinding), so Host
// must be an IP address or one of our names.
func (r *room) checkOrigin(req *http.Request) error {
	host := (&url.URL{Host: req.Host}).Hostname() // no port, no brackets
	if net.ParseIP(host) == nil && !r.hosts[strings.ToLower(host)] {
		r.logf("refused a WebSocket for Host %q: if that is this server, run it with -host %s", req.Host, host)
		return errors.New("not this server")
	}
	origin := req.Header.Get("Origin") // none: not a browser
	if u, err := url.Parse(origin); origin != "" && (err != nil || !strings.EqualFold(u.Host, req.Host)) {
		r.logf("refused a WebSocket from Origin %q for Host %q: behind a proxy, pass Host with its port "+
			"(nginx: proxy_set_header Host $http_host)", origin, req.Host)
		return errors.New("another site")
	}
	return nil
}

// ourNames are localhost, this machine's name, and those given with -host.
func ourNames(names []string) map[string]bool {
	if hostname, _ := os.Hostname(); hostname != "" {
		hostname = strings.TrimSuffix(hostname, ".local") // as macOS may give it
		names = append(names, hostname, hostname+".local")
	}
	ours := map[string]bool{"localhost": true}
	for _, name := range names {
		ours[strings.ToLower(name)] = true
	}
	return ours
}

// Starting: main listens, prints where to point a browser, and serves.
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
	signalled, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	context.AfterFunc(signalled, func() { stop(); log.Print("shutting down"); srv.Close() }) // after stop, a second Ctrl-C kills
	if err := srv.Serve(ln); err != http.ErrServerClosed {
		log.Fatal(err)
	}
	r.shutdown()
}

func printURLs(w io.Writer, addr *net.TCPAddr) {
	fmt.Fprintln(w, "wschat is running. Open it in a browser:")
	if !addr.IP.IsUnspecified() {
		fmt.Fprintf(w, "  http://%s\n", addr)
		return
	}
	fmt.Fprintf(w, "  http://localhost:%d\n", addr.Port)
	ifaceAddrs, _ := net.InterfaceAddrs() // none on error: localhost has to do
	for _, a := range ifaceAddrs {
		if ipnet, ok := a.(*net.IPNet); ok && ipnet.IP.To4() != nil && !ipnet.IP.IsLoopback() {
			fmt.Fprintf(w, "  http://%s:%d\n", ipnet.IP, addr.Port)
		}
	}
}

// Shutdown. Ctrl-C should end each connection with a close frame, after what
// was queued for it, without hanging on a client that reads nothing; but
// srv.Close forgets hijacked connections. So shutdown drops every client,
// with no leave (the page would show each), and waits for them to close.
func (r *room) shutdown() {
	r.mu.Lock()
	r.closing = true // join lets nobody in, and adds to conns no more
	for c := range r.clients {
		r.dropLocked(c, "server shutting down")
	}
	r.mu.Unlock()
	r.conns.Wait()
}

// ---- Part 3: what x/net/websocket leaves to us ----
//
// x/net does the handshake, frames and masking, and answers pings; wsConn adds
// what other WebSocket libraries have besides (with those, this part would go).

// A wsConn is one WebSocket connection, and when its client was last heard.
type wsConn struct {
	ws         *websocket.Conn
	r          io.Reader // the TCP connection, for Read
	remoteAddr string
	started    time.Time
	heard      atomic.Int64 // when a byte last arrived, as time since started: a cheap atomic
}

// upgrade hijacks the connection first, so that we see every byte and
// net/http's goroutine and buffers can go; then, on a goroutine of its own,
// it serves the handshake, if check lets it, and calls serve. The bytes: x/net
// reads pongs inside Receive and drops them, and the room's clock must see
// them; but x/net reads through the *bufio.Reader it gets by calling Hijack on
// the ResponseWriter it is handed. So upgrade hands x/net one whose Hijack
// returns a 512-byte bufio.Reader (chat messages are short) on wsConn, whose
// Read notes the time.
func upgrade(w http.ResponseWriter, req *http.Request, check func(*http.Request) error, serve func(*wsConn)) {
	netConn, rw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return // cannot happen on HTTP/1.1
	}
	early, _ := rw.Reader.Peek(rw.Reader.Buffered()) // sent before our 101; copied, as net/http's buffer goes
	conn := &wsConn{r: io.MultiReader(bytes.NewReader(bytes.Clone(early)), netConn), remoteAddr: req.RemoteAddr,
		started: time.Now()}
	go websocket.Server{ // not websocket.Handler: it refuses clients without Origin, all but browsers
		Handshake: func(config *websocket.Config, req *http.Request) error {
			config.Protocol = nil // decline every subprotocol: x/net would echo one, as if it spoke it
			return check(req)
		},
		Handler: func(ws *websocket.Conn) {
			ws.MaxPayloadBytes = maxMessageBytes // x/net's default is 32 MB
			conn.ws = ws
			serve(conn) // x/net closes TCP when it returns
		},
	}.ServeHTTP(hijacked{conn: netConn, rw: bufio.NewReadWriter(bufio.NewReaderSize(conn, 512), rw.Writer)}, req)
}

// hijacked is a ResponseWriter whose Hijack returns a connection already taken.
type hijacked struct {
	http.ResponseWriter // nil: x/net calls no method but Hijack
	conn                net.Conn
	rw                  *bufio.ReadWriter
}

func (h hijacked) Hijack() (net.Conn, *bufio.ReadWriter, error) { return h.conn, h.rw, nil }

// lastHeard is when a byte last arrived: a message, a pong, anything.
func (c *wsConn) lastHeard() time.Time { return c.started.Add(time.Duration(c.heard.Load())) }
func (c *wsConn) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if n > 0 {
		c.heard.Store(int64(time.Since(c.started)))
	}
	return n, err
}

// receiveText returns the next text frame: x/net reads frames, not messages.
// It answers pings inside, so a pong waits while the reader does. A close
// frame, the end of TCP, or an unmasked frame (x/net answers 1002) is EOF.
func (c *wsConn) receiveText() (string, error) {
	var text []byte
	err := textFrame.Receive(c.ws, &text)
	if err == io.EOF {
		return "", errors.New("closed the connection")
	}
	return string(text), err // or too large, binary, or a drop's deadline
}

func (c *wsConn) sendText(text []byte) error { return textFrame.Send(c.ws, text) }

// textFrame is x/net's websocket.Message for text frames only.
var textFrame = websocket.Codec{
	Marshal: func(v any) ([]byte, byte, error) { return v.([]byte), websocket.TextFrame, nil },
	Unmarshal: func(data []byte, payloadType byte, v any) error {
		if payloadType != websocket.TextFrame {
			return errors.New("sent a binary frame")
		}
		*v.(*[]byte) = data
		return nil
	},
}

// ping sends a ping. x/net has no call for it, but a Codec chooses the frame type.
func (c *wsConn) ping() error { return pingFrame.Send(c.ws, nil) }

var pingFrame = websocket.Codec{Marshal: func(any) ([]byte, byte, error) { return nil, websocket.PingFrame, nil }}

// cutOff makes a read in progress fail now, and writes fail after grace. Not
// x/net's Close, which writes a close frame under a write's lock, so it would
// wait for a write blocked on a client that reads nothing. No deadline is set
// before: x/net writes pongs too, and one left from a write would fail them.
func (c *wsConn) cutOff(grace time.Duration) {
	c.ws.SetReadDeadline(time.Now())
	c.ws.SetWriteDeadline(time.Now().Add(grace))
}

// close sends a close frame (1000, no reason: x/net's only kind), and closes TCP.
func (c *wsConn) close() { c.ws.Close() }
