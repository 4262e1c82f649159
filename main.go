// Command wschat is a chat room for everyone on your network, and a lesson
// in how a real-time server is built, in three parts; stop after any. Part 1
// is the chat; part 2, what the network does to it; part 3, what
// golang.org/x/net/websocket leaves to us.
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
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/websocket"
)

// ---- Part 1: the chat ----
//
// Each connection has two goroutines. Its reader puts each message it reads
// into every client's queue, under the room's lock, so that all get the same
// order; its writer sends its own queue, so a slow client delays only itself.

//go:embed index.html
var indexHTML []byte // the page, which server serves at /

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

// encode makes ev one line of JSON, leaving HTML as it is (the page shows text).
func encode(ev event) []byte {
	var line bytes.Buffer
	enc := json.NewEncoder(&line)
	enc.SetEscapeHTML(false)
	enc.Encode(ev) // cannot fail on strings and ints
	return bytes.TrimSuffix(line.Bytes(), []byte("\n"))
}

// A room is everyone connected, and the last messages.
//
// The lock rule: room.mu guards the fields below it, and each client's
// leftBecause, pingedAt and wake; client.mu guards that client's queue.
// Whoever needs both takes room.mu first, so they cannot deadlock. Nobody
// holds either while writing to the network or the log, which can block.
type room struct {
	limits                                  // the rules of part 2
	logf   func(format string, args ...any) // log.Printf; tests narrate
	hosts  map[string]bool                  // the names this server answers to (part 2, story 5)
	run    string                           // new at every start (see hello)
	conns  sync.WaitGroup                   // joined connections not yet closed; Add only under mu (part 2, story 7)

	mu                 sync.Mutex
	clients            map[*client]bool
	lastUID, lastMsgID int
	history            [][]byte // the last historySize msg events, oldest first
	closing            bool     // shutting down: nobody may join (part 2, story 7)
}

// A client is one connection in the room.
type client struct {
	uid         int
	ws          *websocket.Conn
	tcp         *heardConn    // its TCP connection, which knows when it last heard the client (part 3)
	wake        chan struct{} // tells the writer there is something to send
	leftBecause string        // why the client left: the first reason given
	pingedAt    time.Time     // when the room's clock last asked for a ping (part 2, story 3)
	pingDue     atomic.Bool   // the clock asks the writer to send a ping (part 2, story 3)

	mu    sync.Mutex
	queue [][]byte // events the writer has not taken yet
}

// server serves the page at / and the chat at /ws, where x/net's
// websocket.Server answers the handshake (after our check, part 2) with 101,
// then calls serveClient on the same goroutine: the client's reader.
func (r *room) server() *http.Server {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Write(indexHTML)
	})
	mux.Handle("GET /ws", websocket.Server{Handshake: r.handshake, Handler: r.serveClient})
	return &http.Server{Handler: mux, ReadHeaderTimeout: r.headerTimeout,
		ConnContext: rememberConn} // part 3: hearing pongs
}

// serveClient is one connection's life, on its reader: join, start the
// writer, read until the client goes, leave, wait for the writer to send
// what is left, and close the connection with a close frame.
func (r *room) serveClient(ws *websocket.Conn) {
	ws.MaxPayloadBytes = maxMessageBytes // a larger frame fails the read; x/net's default is 32 MB
	c, online := r.join(ws)
	if c == nil { // shutting down
		ws.Close()
		return
	}
	defer r.conns.Done() // join did the Add (part 2, story 7)
	var writer sync.WaitGroup
	writer.Go(func() { r.writeEvents(c) })
	r.logf("user %d joined from %s (%d online)", c.uid, ws.Request().RemoteAddr, online)
	reason := r.drop(c, r.readMessages(c)) // drop returns the first reason given, maybe another
	writer.Wait()
	ws.Close() // sends a close frame, if the write deadline allows, and closes TCP
	r.logf("user %d left: %s", c.uid, reason)
}

// join gives the connection the next user id and a queue that starts with
// hello and the history, and tells everyone else (nil: shutting down). It
// holds the lock every broadcast takes, so no message slips in between.
func (r *room) join(ws *websocket.Conn) (c *client, online int) {
	tcp := heardConnOf(ws) // part 3: hearing pongs
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closing {
		return nil, 0
	}
	r.conns.Add(1) // under the lock: part 2, story 7
	r.lastUID++
	online = len(r.clients) + 1
	hello := encode(event{Type: "hello", UID: r.lastUID, Online: online, Run: r.run, History: len(r.history)})
	c = &client{uid: r.lastUID, ws: ws, tcp: tcp, wake: make(chan struct{}, 1),
		queue: append([][]byte{hello}, r.history...)}
	c.wakeWriter()
	r.clients[c] = true
	r.broadcastLocked(encode(event{Type: "join", UID: c.uid, Online: online}), c)
	return c, online
}

// readMessages relays the client's messages until a read fails, and returns why.
func (r *room) readMessages(c *client) (reason string) {
	var floodClock time.Time // part 2, story 4
	for {
		var text string
		err := textOnly.Receive(c.ws, &text) // websocket.Message.Receive, refusing binary (part 3)
		if err == io.EOF {
			return "closed the connection" // a close frame, or TCP's end
		} else if err != nil {
			return err.Error() // a frame too large or binary, or a drop's deadline
		}
		if !r.broadcastMessage(c, strings.TrimSpace(text)) {
			return "dropped" // with frames still in the buffer, past the read deadline
		}
		r.limitFlood(&floodClock) // waits, if the client sends too fast
	}
}

// broadcastMessage sends a message to everyone, its sender too, and keeps it
// for newcomers; it ignores an empty one. If the room has dropped the sender,
// it sends nothing, and reports false.
func (r *room) broadcastMessage(from *client, text string) (inRoom bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.clients[from] || text == "" { // dropped during the read, or nothing to say
		return r.clients[from]
	}
	r.lastMsgID++
	ev := encode(event{Type: "msg", ID: r.lastMsgID, UID: from.uid, Msg: text, At: time.Now().UnixMilli()})
	if r.history = append(r.history, ev); len(r.history) > historySize {
		r.history = r.history[1:]
	}
	r.broadcastLocked(ev, nil)
	return true
}

// broadcastLocked puts ev into every client's queue, except skip's, and
// wakes their writers. r.mu is held, so all queues get events in one order.
// A client with queueLimit events waiting is too slow (part 2, story 1).
// Why drop it after the loop? Say the loop meets carol, whose queue is full,
// halfway. Dropped then, her leave would go into the other queues at once:
// the clients the loop meets later would get it before ev, the others after
// ev. After the loop, everyone gets ev first, then her leave.
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

// wakeWriter tells c's writer there is something to send. One signal waiting
// is enough, as a woken writer empties the whole queue. r.mu must be held,
// because a drop closes wake under it, and a send on a closed channel panics.
func (c *client) wakeWriter() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// writeEvents is c's writer. Each time it is woken, it sends all that is
// queued. It ends when a write fails, or when a drop closes wake (a range
// over a channel ends once the channel is closed and empty).
func (r *room) writeEvents(c *client) {
	for range c.wake {
		runtime.Gosched() // for speed only: broadcasts under way add their events, and one frame takes them all
		if err := c.sendQueued(); err != nil {
			r.drop(c, "write failed: "+err.Error())
			return
		}
	}
}

// sendQueued sends the queue, several events to a text frame, until it is
// empty; before each frame, a ping if the room's clock asked (part 2, story 3).
func (c *client) sendQueued() error {
	for {
		if c.pingDue.Swap(false) {
			if err := pingFrame.Send(c.ws, nil); err != nil { // part 3: x/net has no ping call
				return err
			}
		}
		events := c.takeQueue() // up to 16 KiB of them (part 2, story 1)
		if len(events) == 0 {
			return nil
		}
		if err := textOnly.Send(c.ws, bytes.Join(events, []byte("\n"))); err != nil { // websocket.Message.Send, as text (part 3)
			return err
		}
	}
}

// drop, or dropLocked with r.mu held, takes c out of the room, tells
// everyone left, and ends c's goroutines: the reader's read fails at once,
// and the writer ends after sending what was queued (part 2, story 2).
// Anyone may call it: the reader, the writer, a broadcast, the clock,
// shutdown. Only the first call counts; drop returns its reason.
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
	c.endGoroutines()
	if !r.closing {
		r.broadcastLocked(encode(event{Type: "leave", UID: c.uid, Online: len(r.clients)}), nil)
	}
}

// ---- Part 2: what the network does to the chat ----
//
// Each story is something a LAN does to part 1, and the rule for it, with
// its numbers in limits (tests lower them on a room of their own).
type limits struct {
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

// Story 1: a client too slow to read.
// A laptop on a weak link reads slower than a busy room talks. Its writer
// waits in a write, and events wait in its queue. broadcastLocked drops a
// client with queueLimit events waiting. (A phone whose screen is off reads
// nothing; story 3's rule usually drops it first, at 60 s.) One that catches
// up gets frames of up to maxFrameBytes, as clients limit what they accept.
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

// Story 2: ending a dropped client.
// A dropped client's reader may be waiting in a read, and its writer in a
// write to a phone that reads nothing. In Go, such a wait ends only when the
// connection closes or a deadline passes. So a drop sets two deadlines and
// closes wake. The read deadline is now, so the read fails at once. The write
// deadline is closeGrace away. A client that still reads gets its last
// events and a close frame. A write to one that reads nothing fails after
// 1 s. With wake closed, the writer ends once the queue is empty. (x/net's
// Close writes a close frame, so serveClient calls it after the writer ends.)
func (c *client) endGoroutines() {
	c.ws.SetReadDeadline(time.Now())
	c.ws.SetWriteDeadline(time.Now().Add(closeGrace))
	close(c.wake)
}

// Story 3: a client that vanishes.
// A phone walks out of the Wi-Fi: no close frame, no TCP reset, just
// silence, which TCP would retry for a quarter of an hour. So once a second
// the room's clock (started by newRoom) checks when each client was last
// heard; any byte counts (part 3 says how we know). Silent for pingAfter, a
// client gets a ping, which every WebSocket client answers with a pong.
// Silent for dropAfter, it is gone. The ping goes out before the events in
// the queue, so a slow reader still answers. Tests call checkClients at
// made-up times.
func (r *room) checkClients(now time.Time) (running bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for c := range r.clients {
		switch silent := now.Sub(c.tcp.lastHeard()); {
		case silent >= r.dropAfter: // a drop deletes c from r.clients, which Go allows mid-range
			r.dropLocked(c, fmt.Sprintf("heard nothing for %.0f s", r.dropAfter.Seconds()))
		case silent >= r.pingAfter && now.Sub(c.pingedAt) >= r.pingAfter:
			c.pingedAt = now
			c.pingDue.Store(true)
			c.wakeWriter()
		}
	}
	return !r.closing
}

// Story 4: a client that floods.
// A bot sends a thousand messages at once, and buries the conversation. A
// person sends a few at once, then pauses. So a client's floodClock is the
// time up to which its messages are paid for, at floodInterval each. It
// starts from now whenever it is behind, so quiet time saves nothing up. The
// reader reads no message that would take the clock more than a burst
// (floodBurst messages) ahead of now. It sleeps instead, and TCP holds the
// client back meanwhile, so nothing is lost. With the defaults, a quiet
// client's first 20 messages take its clock 2 s ahead, at once; from then
// on, the reader sleeps 0.1 s before each message.
func (r *room) limitFlood(floodClock *time.Time) {
	now := time.Now()
	if floodClock.Before(now) {
		*floodClock = now
	}
	*floodClock = floodClock.Add(r.floodInterval)          // the message just read is paid for
	burst := time.Duration(r.floodBurst) * r.floodInterval // 2 s with the defaults
	afterNext := floodClock.Add(r.floodInterval)           // where the next message would take the clock
	time.Sleep(afterNext.Sub(now) - burst)                 // until that is within a burst of now; no wait if it is
}

// Story 5: a page from another site.
// Any page you open could chat here in your name, since your browser can
// reach this server. The browser sends the page's site as Origin, and handshake
// refuses one that is not the Host asked for. A page can also point a name
// of its own at your LAN address (DNS rebinding), so Host must be an IP
// address or one of our names. x/net calls handshake before it answers 101.
// It also declines every subprotocol, or x/net would echo the client's.
func (r *room) handshake(config *websocket.Config, req *http.Request) error {
	config.Protocol = nil
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

// Story 6: starting.
// main listens, prints where to point a browser, and serves until Ctrl-C
// (SIGINT), or SIGTERM as docker stop and systemd send; then it shuts down.
// A second signal ends the process at once.
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
	context.AfterFunc(signalled, func() { stop(); log.Print("shutting down"); srv.Close() }) // stop: the next signal kills
	if err := srv.Serve(hearingListener{ln}); err != http.ErrServerClosed {
		log.Fatal(err)
	}
	r.shutdown()
}

// newRoom makes a room that answers to localhost, this machine's name, and
// these names (story 5), and starts its clock (story 3).
func newRoom(names ...string) *room {
	if hostname, _ := os.Hostname(); hostname != "" {
		hostname = strings.TrimSuffix(hostname, ".local") // as macOS may give it
		names = append(names, hostname, hostname+".local")
	}
	r := &room{limits: defaultLimits, logf: log.Printf, hosts: map[string]bool{"localhost": true},
		run: rand.Text(), clients: map[*client]bool{}}
	for _, name := range names {
		r.hosts[strings.ToLower(name)] = true
	}
	go func() { // the clock (story 3), until shutdown
		for now := range time.Tick(time.Second) {
			if !r.checkClients(now) {
				return
			}
		}
	}()
	return r
}

// printURLs prints the address listened on; for all, localhost and each IPv4 one.
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

// Story 7: shutting down.
// Each client should get its last events and a close frame, but one that
// reads nothing must not hold the process up. srv.Close does not close the
// connections x/net took. So shutdown drops every client (story 2), sends no
// leave, and waits for each connection to close. closing keeps newcomers out,
// and join counts each connection under the same lock, before the wait.
func (r *room) shutdown() {
	r.mu.Lock()
	r.closing = true
	for c := range r.clients {
		r.dropLocked(c, "server shutting down")
	}
	r.mu.Unlock()
	r.conns.Wait()
}

// ---- Part 3: what x/net/websocket leaves to us ----
//
// x/net does the handshake, the frames and their masks, and answers pings.
// It lacks three things the chat needs, which gorilla's and coder's have.

// Hearing pongs. The room's clock (story 3) must know when each client was
// last heard, and a quiet client is heard only through its pongs. But x/net
// reads pongs inside Receive and drops them. So we listen on TCP instead:
//  1. main's hearingListener wraps each connection it accepts in a heardConn;
//  2. heardConn's Read notes the time whenever bytes arrive, pongs included;
//  3. rememberConn (ConnContext) puts it in the requests' context, for join.
type heardConn struct {
	net.Conn
	accepted time.Time
	heard    atomic.Int64 // when a byte last came, as time since accepted; atomic: the clock reads it
}

func (c *heardConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.heard.Store(int64(time.Since(c.accepted))) // Since: the monotonic clock, which never jumps
	}
	return n, err
}

func (c *heardConn) lastHeard() time.Time { return c.accepted.Add(time.Duration(c.heard.Load())) }

type hearingListener struct{ net.Listener }

func (l hearingListener) Accept() (net.Conn, error) {
	conn, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &heardConn{Conn: conn, accepted: time.Now()}, nil
}

func rememberConn(ctx context.Context, conn net.Conn) context.Context {
	return context.WithValue(ctx, heardConnKey{}, conn)
}

// heardConnOf panics unless a hearingListener (as main's) accepted the connection.
func heardConnOf(ws *websocket.Conn) *heardConn {
	return ws.Request().Context().Value(heardConnKey{}).(*heardConn)
}

type heardConnKey struct{}

// Sending a ping. x/net has no call, but a Codec chooses the frame's type.
var pingFrame = websocket.Codec{Marshal: func(any) ([]byte, byte, error) { return nil, websocket.PingFrame, nil }}

// Text frames only. websocket.Message receives a binary frame as text, and
// sends a []byte as binary, or a string by copying it, frame after frame.
// textOnly is websocket.Message for text frames only, and copies nothing.
var textOnly = websocket.Codec{
	Marshal: func(v any) ([]byte, byte, error) { return v.([]byte), websocket.TextFrame, nil },
	Unmarshal: func(data []byte, frameType byte, v any) error {
		if frameType != websocket.TextFrame {
			return errors.New("sent a binary frame")
		}
		*v.(*string) = string(data)
		return nil
	},
}
