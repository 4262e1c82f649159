// Command wschat is a chat room for everyone on your network, in one file.
//
// Run it with `go run .` and open the printed address in a few browsers. Every
// message is sent to everyone, in the same order, over WebSockets.
//
// How data flows, in the order this file reads:
//
//	connect -> user id -> hello/join -> read loop -> broadcast -> per-client writer -> leave
//
// One mutex guards the room: the map of clients and each client's queue of
// outgoing events. Broadcasting appends one encoded event to every queue while
// holding it, which is what gives every client the same order. Nobody ever
// waits on a network write while holding it: each client's writer goroutine
// sends that client's queue on its own, so one slow client cannot stall the
// room. A client that falls too far behind is disconnected, never skipped.
package main

import (
	"bufio"
	"bytes"
	"context"
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
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/net/websocket"
)

//go:embed index.html
var indexHTML []byte

// The limits. A room copies them when it is made; tests lower them on their
// own room so that, say, a slow client is found slow in milliseconds.
const (
	maxMessageBytes = 4096                   // a larger frame closes the sender's connection
	queueLimit      = 4096                   // events waiting for one client before it counts as too slow
	writeTimeout    = 10 * time.Second       // a write blocked this long: the client is stuck or gone
	floodBurst      = 20                     // messages a client may send at once...
	floodRate       = 10                     // ...and per second after that
	presenceDelay   = 100 * time.Millisecond // longest a join or leave notice waits for company
	shutdownGrace   = time.Second            // time to finish a write and send a close frame at exit
)

func main() {
	addr := flag.String("addr", ":8080", "`host:port` to listen on; :0 picks a free port")
	flag.Parse()

	// Keep-alive probes are how a peer that vanished (Wi-Fi gone, laptop lid
	// shut) is noticed while the room is quiet: after 30 s of silence, 3 probes
	// 10 s apart, so within about a minute.
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

	r := newRoom()
	srv := &http.Server{Handler: r.routes(), ReadHeaderTimeout: 10 * time.Second}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	select {
	case err := <-served: // the listener failed: nothing more will connect
		log.Print(err)
		os.Exit(1)
	case <-ctx.Done():
	}
	log.Print("shutting down")
	// Close stops the listener and plain HTTP connections, but it does not
	// touch hijacked connections such as WebSockets: the room closes those, and
	// main must not return before it has, or clients see a bare EOF.
	srv.Close()
	r.shutdown()
}

// printURLs says where to point a browser: this machine first, then one
// address per network interface, for phones and laptops on the LAN.
func printURLs(w io.Writer, addr *net.TCPAddr) {
	fmt.Fprintln(w, "wschat is running. Open it in a browser:")
	if !addr.IP.IsUnspecified() { // listening on one address only
		fmt.Fprintf(w, "  http://%s\n", addr)
		return
	}
	fmt.Fprintf(w, "  http://localhost:%d\n", addr.Port)
	ifaceAddrs, _ := net.InterfaceAddrs() // on error, the localhost line has to do
	for _, a := range ifaceAddrs {
		if ipnet, ok := a.(*net.IPNet); ok && ipnet.IP.To4() != nil && !ipnet.IP.IsLoopback() {
			fmt.Fprintf(w, "  http://%s:%d\n", ipnet.IP, addr.Port)
		}
	}
}

// routes serves the page at / and the chat at /ws. Anything else is 404, and
// another method on these paths is 405: ServeMux does both for us.
func (r *room) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Write(indexHTML)
	})
	// websocket.Handler would refuse clients that send no Origin at all, such
	// as command-line tools; websocket.Server lets us write the check we want.
	chat := websocket.Server{Handshake: checkOrigin, Handler: r.serveClient}
	// websocket.Server runs a whole connection inside ServeHTTP, which would
	// keep net/http's goroutine for the request alive as long as the chat
	// lasts, with its deep stack and buffers. So we take the connection over
	// first, and hand it to websocket.Server on a goroutine of our own; the
	// net/http goroutine then ends at once. That, and buffers sized for a
	// chat, take an idle connection from 42 KB to 27 KB (see README).
	mux.HandleFunc("GET /ws", func(w http.ResponseWriter, req *http.Request) {
		conn, rw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		// net/http's are 4 KB each. Clients send small messages, slowly, and a
		// batch larger than the write buffer costs one extra write, not more.
		if rw.Reader.Buffered() == 0 { // else the client's first bytes are in there
			rw = bufio.NewReadWriter(bufio.NewReaderSize(conn, 512), bufio.NewWriterSize(conn, 1024))
		}
		go chat.ServeHTTP(hijacked{conn, rw}, req)
	})
	return mux
}

// hijacked is the ResponseWriter of a connection we have taken over already:
// all websocket.Server does with it is take it over again.
type hijacked struct {
	conn net.Conn
	rw   *bufio.ReadWriter
}

func (h hijacked) Hijack() (net.Conn, *bufio.ReadWriter, error) { return h.conn, h.rw, nil }
func (h hijacked) Header() http.Header                          { return http.Header{} }
func (h hijacked) Write([]byte) (int, error)                    { return 0, http.ErrHijacked }
func (h hijacked) WriteHeader(int)                              {}

// checkOrigin refuses a handshake started by a page from another site.
// Browsers send cookies and connect from the visitor's own network, so without
// it any web page the visitor opens could join the chat in their name.
// Browsers always send Origin; a missing one means a command-line client.
func checkOrigin(_ *websocket.Config, req *http.Request) error {
	origin := req.Header.Get("Origin")
	if origin == "" {
		return nil
	}
	u, err := url.Parse(origin)
	if err != nil || !strings.EqualFold(u.Host, req.Host) {
		return fmt.Errorf("origin %q may not connect to %q", origin, req.Host)
	}
	return nil
}

// An event is what the server sends: hello, join, leave or msg.
type event struct {
	Type   string `json:"type"`
	UID    int    `json:"uid"`
	Online int    `json:"online,omitempty"`
	Msg    string `json:"msg,omitempty"`
}

// encode turns an event into the bytes of one line of a frame. It is called
// once per event, however many clients receive it. encoding/json never fails
// on strings and ints, and it writes invalid UTF-8 as U+FFFD, so the result is
// always valid JSON on one line.
func encode(ev event) []byte {
	b, _ := json.Marshal(ev)
	return b
}

// A room is the set of connected clients and everything sent to them.
type room struct {
	queueLimit    int
	writeTimeout  time.Duration
	floodBurst    int
	floodInterval time.Duration // time between messages, once the burst is spent
	presenceDelay time.Duration
	logf          func(format string, args ...any)

	mu             sync.Mutex
	clients        map[*client]bool
	lastUID        int  // user ids count up and are never reused
	flushScheduled bool // flushPresence will run within presenceDelay
	closing        bool // shutting down: nobody new may join
	handlers       sync.WaitGroup
}

// A client is one WebSocket connection. serveClient owns it from handshake to
// close; the client's writer borrows it while there are events to send.
type client struct {
	uid  int
	conn *websocket.Conn

	// Guarded by room.mu.
	queue   [][]byte       // encoded events the writer has not taken yet
	writing bool           // a writer goroutine is running
	writer  sync.WaitGroup // done when that writer has ended
}

func newRoom() *room {
	return &room{
		queueLimit:    queueLimit,
		writeTimeout:  writeTimeout,
		floodBurst:    floodBurst,
		floodInterval: time.Second / floodRate,
		presenceDelay: presenceDelay,
		logf:          log.Printf,
		clients:       make(map[*client]bool),
	}
}

// serveClient runs for the whole life of one connection, on the goroutine
// routes started for it. It joins the room, reads until the client goes,
// then leaves and closes the connection. Nothing else closes a connection.
func (r *room) serveClient(conn *websocket.Conn) {
	conn.MaxPayloadBytes = maxMessageBytes // the default is 32 MB
	c := r.join(conn)
	if c == nil {
		conn.Close() // shutting down
		return
	}
	defer r.handlers.Done()

	reason := r.readMessages(c)
	r.leave(c, reason)
	c.writer.Wait() // the writer is the only other user of conn: let it finish
	// A close frame, then the TCP connection. If the room cut the connection
	// short (a past deadline), only the TCP connection.
	conn.Close()
}

// join gives the connection the next user id, says hello to it and tells
// everyone else. It returns nil if the server is shutting down.
func (r *room) join(conn *websocket.Conn) *client {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closing {
		return nil
	}
	r.handlers.Add(1)
	r.lastUID++
	c := &client{uid: r.lastUID, conn: conn}
	r.clients[c] = true
	online := len(r.clients)
	r.logf("user %d joined from %s (%d online)", c.uid, conn.Request().RemoteAddr, online)
	r.sendLocked(c, encode(event{Type: "hello", UID: c.uid, Online: online}), true)
	r.broadcastLocked(encode(event{Type: "join", UID: c.uid, Online: online}), c, false)
	return c
}

// readMessages relays the client's messages until its connection fails, and
// says why it stopped.
//
// Flood control is a token bucket kept as one time: nextRead, the moment the
// next frame may be read. Each frame moves it one interval on, and it never
// lags more than floodBurst-1 intervals behind now: that lag is the burst a
// quiet client has saved up. Until nextRead we simply do not read, so TCP makes
// a flooder wait: nothing is dropped and nobody else is slowed.
func (r *room) readMessages(c *client) (reason string) {
	var nextRead time.Time
	savedBurst := time.Duration(r.floodBurst-1) * r.floodInterval
	for {
		time.Sleep(time.Until(nextRead)) // at most one interval; no wait at all while within the limit
		var text string
		err := textMessage.Receive(c.conn, &text)
		nextRead = later(nextRead, time.Now().Add(-savedBurst)).Add(r.floodInterval)
		switch {
		case errors.Is(err, websocket.ErrFrameTooLarge):
			return fmt.Sprintf("sent a frame over %d bytes", maxMessageBytes)
		case errors.Is(err, errNotText):
			return "sent a binary frame"
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

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// textMessage receives one frame as a string, like websocket.Message, but
// refuses binary frames: this chat speaks text.
var textMessage = websocket.Codec{Unmarshal: func(data []byte, payloadType byte, v any) error {
	if payloadType != websocket.TextFrame {
		return errNotText
	}
	*v.(*string) = string(data)
	return nil
}}

var errNotText = errors.New("not a text frame")

// broadcastMessage sends one chat message to everyone, its sender included.
func (r *room) broadcastMessage(from *client, text string) {
	ev := encode(event{Type: "msg", UID: from.uid, Msg: text}) // outside the lock: it may be 4 KB
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.clients[from] { // a client the room has dropped speaks no more
		r.broadcastLocked(ev, nil, true)
	}
}

// broadcastLocked queues an event for every client except skip (see
// sendLocked for urgent). It never waits on a connection. A client whose
// queue is already full cannot keep up: it is dropped, and its leave
// broadcast in turn, rather than skipped.
// r.mu must be held; holding it is what gives every client the same order.
func (r *room) broadcastLocked(ev []byte, skip *client, urgent bool) {
	var tooSlow []*client
	for c := range r.clients {
		if c == skip {
			continue
		}
		if len(c.queue) >= r.queueLimit {
			tooSlow = append(tooSlow, c)
			continue
		}
		r.sendLocked(c, ev, urgent)
	}
	for _, c := range tooSlow {
		r.dropLocked(c, fmt.Sprintf("too slow: %d events waiting", len(c.queue)))
	}
}

// sendLocked queues one event for one client. An urgent event (hello, or a
// chat message) starts the client's writer at once. A join or leave notice
// waits for the next presence flush instead, at most presenceDelay away:
// when a thousand people arrive at once, each client then gets one frame
// per flush rather than one per arrival. Either way the queue keeps its order.
func (r *room) sendLocked(c *client, ev []byte, urgent bool) {
	c.queue = append(c.queue, ev)
	if urgent {
		r.startWriterLocked(c)
	} else if !r.flushScheduled {
		r.flushScheduled = true
		time.AfterFunc(r.presenceDelay, r.flushPresence)
	}
}

// flushPresence starts the writer of every client that has notices waiting.
func (r *room) flushPresence() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.flushScheduled = false
	for c := range r.clients {
		if len(c.queue) > 0 {
			r.startWriterLocked(c)
		}
	}
}

// startWriterLocked starts the client's writer unless it is running. A writer
// exists only while there is something to write, so an idle connection costs
// no goroutine of its own.
func (r *room) startWriterLocked(c *client) {
	if !c.writing {
		c.writing = true
		c.writer.Add(1)
		go r.writeQueue(c)
	}
}

// Writers borrow a buffer to join a batch into, rather than allocate one
// per write: in a busy room that is most of the server's garbage.
var batchBuffers = sync.Pool{New: func() any { return new(bytes.Buffer) }}

// writeQueue is a client's writer. Each round it takes everything queued so
// far and writes it as one frame, one event per line: when events pile up, a
// busy room costs one write per batch instead of one per event. It ends when
// the queue is empty, when the client has left, or when a write fails.
func (r *room) writeQueue(c *client) {
	defer c.writer.Done()
	for {
		r.mu.Lock()
		batch := c.queue
		c.queue = nil
		if len(batch) == 0 || !r.clients[c] {
			c.writing = false
			r.mu.Unlock()
			return
		}
		// Set under r.mu, so a deadline set later by dropLocked or shutdown
		// always wins over this one.
		c.conn.SetWriteDeadline(time.Now().Add(r.writeTimeout))
		r.mu.Unlock()

		frame := batchBuffers.Get().(*bytes.Buffer)
		frame.Reset()
		for i, ev := range batch {
			if i > 0 {
				frame.WriteByte('\n')
			}
			frame.Write(ev)
		}
		_, err := c.conn.Write(frame.Bytes())
		if frame.Cap() <= 64<<10 { // a rare huge batch is not worth keeping
			batchBuffers.Put(frame)
		}
		if err != nil {
			reason := "write failed: " + err.Error()
			if errors.Is(err, os.ErrDeadlineExceeded) {
				reason = fmt.Sprintf("too slow: a write blocked for %v", r.writeTimeout)
			}
			r.mu.Lock()
			r.dropLocked(c, reason)
			r.mu.Unlock()
			return
		}
	}
}

// leave takes a client out of the room after its connection ended.
func (r *room) leave(c *client, reason string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.removeLocked(c, reason)
}

// dropLocked is how the room gives up on a client: it leaves, and its
// connection's deadlines are moved to now. That wakes its owner from a blocked
// read and its writer from a blocked write (Close would not do: it waits for
// the write lock that a blocked write holds), and serveClient does the rest.
func (r *room) dropLocked(c *client, reason string) {
	r.removeLocked(c, reason)
	c.conn.SetDeadline(time.Now())
}

// removeLocked takes c out of the room, once, and tells everyone left.
func (r *room) removeLocked(c *client, reason string) {
	if !r.clients[c] {
		return
	}
	delete(r.clients, c)
	c.queue = nil
	r.logf("user %d left: %s (%d online)", c.uid, reason, len(r.clients))
	if !r.closing {
		r.broadcastLocked(encode(event{Type: "leave", UID: c.uid, Online: len(r.clients)}), nil, false)
	}
}

// shutdown closes every connection with a close frame, and returns once all
// are closed, within shutdownGrace plus a flood-control pause at most.
func (r *room) shutdown() {
	r.mu.Lock()
	r.closing = true
	grace := time.Now().Add(shutdownGrace)
	for c := range r.clients {
		r.removeLocked(c, "server shutting down")
		// A write in progress may finish and the close frame follow it, both
		// before grace; a write to a client that stopped reading is cut short.
		c.conn.SetWriteDeadline(grace)
		c.conn.SetReadDeadline(time.Now()) // wake the owner
	}
	r.mu.Unlock()
	r.handlers.Wait()
}
