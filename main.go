// Command wschat is a chat room for everyone on your network, in one file.
//
// The file reads in the order data flows: connect, join, read loop,
// broadcast, writer, drop. Each connection has two goroutines: serveClient
// reads from it, and the client's writer writes to it. A broadcast only
// appends to every client's queue, so one slow client cannot stall the room.
package main

import (
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
	"syscall"
	"time"

	"golang.org/x/net/websocket"
)

//go:embed index.html
var indexHTML []byte

const (
	maxMessageBytes = 4096        // a larger frame closes the sender's connection
	maxFrameBytes   = 16 << 10    // events share a frame up to this size; a larger one travels alone
	historySize     = 100         // chat messages a newcomer is sent from before it came
	closeGrace      = time.Second // a dropped client's last write and close frame must be done by then
	watchEvery      = time.Second // how often the room looks at every writer (watchWriters)
)

// limits are a room's rules; tests lower them on their own room.
type limits struct {
	queueLimit    int           // events waiting for one client before it is too slow
	writeTimeout  time.Duration // a write blocked this long: the client is stuck or gone
	pingInterval  time.Duration // nothing written to a client for this long: ping it
	floodBurst    int           // messages a client may send at once...
	floodInterval time.Duration // ...and then one per interval
}

var defaultLimits = limits{queueLimit: 4096, writeTimeout: 10 * time.Second,
	pingInterval: 30 * time.Second, floodBurst: 20, floodInterval: time.Second / 10}

func main() {
	addr := flag.String("addr", ":8080", "`host:port` to listen on; :0 picks a free port")
	hosts := flag.String("host", "", "other `names` of this server, comma-separated, for the chat to accept")
	flag.Parse()
	// Keep-alive notices a peer that vanished (Wi-Fi gone, lid shut) in a
	// quiet room: after 30 s of silence, 3 probes 10 s apart.
	lc := net.ListenConfig{KeepAliveConfig: net.KeepAliveConfig{
		Enable: true, Idle: 30 * time.Second, Interval: 10 * time.Second, Count: 3,
	}}
	ln, err := lc.Listen(context.Background(), "tcp", *addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "wschat:", err)
		os.Exit(1)
	}
	printURLs(os.Stdout, ln.Addr().(*net.TCPAddr))

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	r := newRoom(strings.Split(*hosts, ",")...)
	srv := &http.Server{Handler: r.routes(), ReadHeaderTimeout: 10 * time.Second}
	go func() { <-ctx.Done(); srv.Close() }() // stops the listener; Serve returns
	if err := srv.Serve(ln); err != http.ErrServerClosed {
		log.Fatal(err) // the listener failed: nobody else can connect
	}
	log.Print("shutting down")
	// x/net hijacked each WebSocket from net/http, so srv.Close does not touch
	// them: the room closes them, and main waits, or clients see a bare EOF.
	r.shutdown()
}

// printURLs says where to point a browser: this machine, then one address per
// network interface, for phones and laptops on the LAN.
func printURLs(w io.Writer, addr *net.TCPAddr) {
	fmt.Fprintln(w, "wschat is running. Open it in a browser:")
	if !addr.IP.IsUnspecified() { // listening on one address only
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
	History int    `json:"history,omitempty"` // hello: this many msg events follow it
}

// encode makes an event one line of JSON, ending in the newline that
// separates events in a frame. It does not escape HTML (json.Marshal writes <
// as \u003c, six bytes): the page shows messages as text, never as HTML.
// Invalid UTF-8 becomes U+FFFD, so the line is always valid JSON.
func encode(ev event) []byte {
	var line bytes.Buffer
	enc := json.NewEncoder(&line)
	enc.SetEscapeHTML(false)
	enc.Encode(ev) // cannot fail on strings and ints
	return line.Bytes()
}

// A room is the set of connected clients. The lock rule: r.mu guards the
// fields below it, and so who is in the room; a client's mu guards its queue.
// Whoever needs both takes r.mu first, never the other way round, so they
// cannot deadlock. A writer takes only its client's lock to take its batch,
// so a broadcast never holds it up. No lock is held across a network write or
// a log line: either can block.
type room struct {
	limits // queueLimit, writeTimeout, floodBurst, floodInterval
	logf   func(format string, args ...any)
	hosts  map[string]bool // names the chat answers to, besides IP addresses
	run    string          // tells a page that reconnects whether the server restarted

	mu        sync.Mutex
	clients   map[*client]bool
	lastUID   int            // user ids count up and are never reused
	lastMsgID int            // and so do message ids
	history   [][]byte       // the last historySize msg events, oldest first
	closing   bool           // shutting down: nobody may join
	conns     sync.WaitGroup // counts joined connections until they are closed
}

func newRoom(names ...string) *room {
	r := &room{limits: defaultLimits, logf: log.Printf, run: rand.Text(), clients: make(map[*client]bool)}
	hostname, _ := os.Hostname()
	hostname = strings.TrimSuffix(strings.ToLower(hostname), ".local") // as macOS may give it
	r.hosts = map[string]bool{"localhost": true}
	for _, name := range append(names, hostname, hostname+".local") {
		if name = strings.TrimSpace(name); name != "" {
			r.hosts[strings.ToLower(name)] = true
		}
	}
	go r.watchWriters() // until shutdown
	return r
}

// A client is one connection: serveClient reads, the writer writes.
type client struct {
	uid         int
	conn        *websocket.Conn
	wake        chan struct{} // one slot: "your queue has something"; closed when dropped
	leftBecause string        // set once, when the room drops the client; guarded by r.mu

	mu        sync.Mutex // guards the fields below
	queue     [][]byte   // encoded events the writer has not taken yet
	pingDue   bool       // the room's clock asks the writer for a ping
	writing   bool       // the writer is in a write
	lastWrite time.Time  // when the writer's latest write began
}

// routes serves the page and the chat. ServeMux answers 404 and 405.
func (r *room) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Write(indexHTML)
	})
	// Not websocket.Handler: it refuses clients that send no Origin.
	mux.Handle("GET /ws", websocket.Server{Handshake: r.checkHandshake, Handler: r.serveClient})
	return mux
}

// checkHandshake declines every subprotocol a client offers (x/net would
// echo one back, and refuse two), and refuses another site's page, which could otherwise chat in a
// visitor's name from inside their network. Host must be an IP address or one
// of our names: a site whose DNS name is re-pointed at this server (DNS
// rebinding) sends an Origin that matches its Host. And Origin must name this
// server's Host; no Origin means a command-line client.
func (r *room) checkHandshake(config *websocket.Config, req *http.Request) error {
	config.Protocol = nil // we speak only our own protocol, so we name none
	host, _, err := net.SplitHostPort(req.Host)
	if err != nil {
		host = req.Host // no port
	}
	if host = strings.Trim(host, "[]"); net.ParseIP(host) == nil && !r.hosts[strings.ToLower(host)] {
		r.logf("refused a WebSocket for Host %q: if that is this server, run it with -host %s", req.Host, host)
		return fmt.Errorf("host %q is not this server", req.Host)
	}
	origin := req.Header.Get("Origin")
	if origin == "" {
		return nil
	}
	if u, err := url.Parse(origin); err != nil || !strings.EqualFold(u.Host, req.Host) {
		return fmt.Errorf("origin %q may not connect to %q", origin, req.Host)
	}
	return nil
}

// serveClient is one connection's whole life, on net/http's goroutine for it.
// It starts the client's writer, waits for it to end, and closes conn.
func (r *room) serveClient(conn *websocket.Conn) {
	conn.MaxPayloadBytes = maxMessageBytes // x/net's default is 32 MB
	c, online := r.join(conn)
	if c == nil { // shutting down
		conn.Close()
		return
	}
	defer r.conns.Done()
	var writer sync.WaitGroup
	writer.Go(func() { r.writeQueue(c) })
	r.logf("user %d joined from %s (%d online)", c.uid, conn.Request().RemoteAddr, online)

	reason := r.readMessages(c)
	r.mu.Lock()
	r.dropLocked(c, reason) // a no-op if the room dropped c first
	reason = c.leftBecause  // whoever gave up first says why
	r.mu.Unlock()
	writer.Wait() // dropping ends the writer
	// x/net's Close writes a close frame, then closes the TCP connection. If
	// the drop's write deadline has passed (a stuck client), only the latter happens.
	conn.Close()
	r.logf("user %d left: %s", c.uid, reason)
}

// join gives the connection the next user id, says hello to it and tells
// everyone else. It returns nil if the server is shutting down.
func (r *room) join(conn *websocket.Conn) (c *client, online int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closing {
		return nil, 0
	}
	r.conns.Add(1)
	r.lastUID++
	c = &client{uid: r.lastUID, conn: conn, wake: make(chan struct{}, 1), lastWrite: time.Now()}
	r.clients[c] = true
	online = len(r.clients)
	// The history goes into the queue right after hello, under the lock every
	// broadcast takes: the newcomer's live stream starts where it ends.
	r.enqueue(c, encode(event{Type: "hello", UID: c.uid, Online: online, Run: r.run, History: len(r.history)}))
	for _, ev := range r.history {
		r.enqueue(c, ev)
	}
	r.broadcastLocked(encode(event{Type: "join", UID: c.uid, Online: online}), c)
	return c, online
}

// readMessages relays the client's messages until its connection fails, and
// says why. Flood control is a token bucket kept as one time, nextRead: each
// frame moves it one interval on, and it never lags more than floodBurst-1
// intervals behind now. So a quiet client may send 20 frames at once, and the
// 21st waits 100 ms. Until nextRead we do not read: TCP makes a flooder wait,
// and nothing is dropped.
func (r *room) readMessages(c *client) (reason string) {
	var nextRead time.Time
	for {
		time.Sleep(time.Until(nextRead)) // at most one interval; none within the limit
		var text string
		err := textMessage.Receive(c.conn, &text)
		earliest := time.Now().Add(-time.Duration(r.floodBurst-1) * r.floodInterval)
		if nextRead.Before(earliest) {
			nextRead = earliest
		}
		nextRead = nextRead.Add(r.floodInterval)
		switch {
		case errors.Is(err, io.EOF):
			return "closed the connection"
		case errors.Is(err, syscall.ETIMEDOUT):
			return "vanished: no answer to keep-alive probes"
		case err != nil:
			return err.Error()
		}
		if text = strings.TrimSpace(text); text != "" {
			r.broadcastMessage(c, text)
		}
	}
}

// textMessage is websocket.Message for strings, but refuses binary frames.
var textMessage = websocket.Codec{Unmarshal: func(data []byte, payloadType byte, v any) error {
	if payloadType != websocket.TextFrame {
		return errors.New("sent a binary frame")
	}
	*v.(*string) = string(data)
	return nil
}}

// broadcastMessage sends a chat message to everyone, its sender included,
// and keeps it for newcomers, unless the room dropped the sender while the
// message was being read.
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
// goes into every queue gives everyone the same order. A client whose queue is
// full is dropped, not skipped, after the loop: a leave queued mid-loop would
// reach some clients before ev and others after it.
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
// is full. r.mu must be held: it keeps c in the room, and c.wake open.
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

// wakeWriter fills c.wake's one slot, if it is empty. r.mu must be held: it
// keeps c.wake open.
func (c *client) wakeWriter() {
	select {
	case c.wake <- struct{}{}:
	default: // already woken
	}
}

// writeQueue is the client's writer. Woken, it sends what is queued, as
// many events per frame as fit in maxFrameBytes, one per line: one write per
// frame, not per event. Or it sends the ping the room's clock asked for. It
// ends when the client is dropped (wake is closed) or a write fails. It sets
// no deadline: the room's clock cuts a write that blocks too long.
func (r *room) writeQueue(c *client) {
	var frame []byte // reused for every frame; the frame cap bounds its size
	for range c.wake {
		// Yield first, so that the broadcasts under way can queue more: in a
		// burst, fewer and fuller frames (see README, Performance).
		runtime.Gosched()
		for {
			var ping bool
			frame, ping = c.nextWrite(frame[:0])
			if len(frame) == 0 && !ping {
				break // all sent: wait for the next wake
			}
			var err error
			if ping {
				err = pingFrame.Send(c.conn, nil)
			} else {
				_, err = c.conn.Write(frame[:len(frame)-1]) // no newline after the last event
			}
			c.mu.Lock()
			c.writing = false
			c.mu.Unlock()
			if err != nil {
				r.mu.Lock()
				r.dropLocked(c, "write failed: "+err.Error())
				r.mu.Unlock()
				return
			}
		}
	}
}

// nextWrite appends to frame the queued events that fit in maxFrameBytes, and
// at least one, however large; the rest stay queued, in order. With nothing
// queued, it reports the ping the clock asked for, if any. Either way, it
// notes that a write begins.
func (c *client) nextWrite(frame []byte) (_ []byte, ping bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for n < len(c.queue) && (n == 0 || len(frame)+len(c.queue[n]) <= maxFrameBytes) {
		frame = append(frame, c.queue[n]...)
		n++
	}
	if c.queue = c.queue[n:]; len(c.queue) == 0 {
		c.queue = nil // let the memory of the events sent go
	}
	ping = n == 0 && c.pingDue
	c.pingDue = false
	if c.writing = n > 0 || ping; c.writing {
		c.lastWrite = time.Now()
	}
	return frame, ping
}

// pingFrame sends a ping. x/net has no call for it, but a Codec may choose
// the frame type. x/net reads the client's pong, and drops it, inside Receive.
var pingFrame = websocket.Codec{Marshal: func(any) ([]byte, byte, error) {
	return nil, websocket.PingFrame, nil
}}

// watchWriters is the room's clock: every watchEvery until shutdown, it
// checks on every writer.
func (r *room) watchWriters() {
	tick := time.NewTicker(watchEvery)
	defer tick.Stop()
	for now := range tick.C {
		r.mu.Lock()
		if r.closing {
			r.mu.Unlock()
			return
		}
		r.checkWritersLocked(now)
		r.mu.Unlock()
	}
}

// checkWritersLocked drops every client whose writer has been in one write
// for writeTimeout: its socket is full, so it reads nothing, or it is gone.
// And it asks for a ping where nothing was written for pingInterval, so that
// a proxy does not cut a quiet connection as idle.
func (r *room) checkWritersLocked(now time.Time) {
	var stuck []*client
	for c := range r.clients {
		c.mu.Lock()
		since := now.Sub(c.lastWrite)
		if c.writing && since >= r.writeTimeout {
			stuck = append(stuck, c)
		} else if !c.writing && since >= r.pingInterval {
			c.pingDue = true
			c.wakeWriter()
		}
		c.mu.Unlock()
	}
	for _, c := range stuck { // not above: dropLocked takes every client's lock
		r.dropLocked(c, fmt.Sprintf("too slow: a write blocked for %v", r.writeTimeout))
	}
}

// dropLocked takes c out of the room, once, and tells everyone left, whoever
// gives up first: the client, its writer, a broadcast, the clock or shutdown.
// It reaches c's goroutines through deadlines, not Close, which would wait
// for x/net's write lock while a write blocks: a read deadline of now wakes
// serveClient; the write in progress, if any, and then the close frame must
// be done within closeGrace; closing wake ends the writer.
func (r *room) dropLocked(c *client, reason string) {
	if !r.clients[c] {
		return
	}
	delete(r.clients, c)
	c.leftBecause = reason
	c.mu.Lock()
	c.queue, c.pingDue = nil, false // the writer sends nothing more
	c.mu.Unlock()
	c.conn.SetReadDeadline(time.Now())
	c.conn.SetWriteDeadline(time.Now().Add(closeGrace))
	close(c.wake)
	if !r.closing {
		r.broadcastLocked(encode(event{Type: "leave", UID: c.uid, Online: len(r.clients)}), nil)
	}
}

// shutdown drops everyone and returns once every connection is closed: a
// writer still stuck after closeGrace has only its TCP connection closed, and
// a reader paused by flood control wakes within one interval.
func (r *room) shutdown() {
	r.mu.Lock()
	r.closing = true
	for c := range r.clients {
		r.dropLocked(c, "server shutting down")
	}
	r.mu.Unlock()
	r.conns.Wait()
}
