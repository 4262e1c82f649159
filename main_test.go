package main

// These tests drive the real server: an httptest.Server in front of the same
// routes main serves, and clients that speak WebSocket over real TCP
// connections. Run `go test -v -run TestMessageReachesEveryone` to watch one
// broadcast happen, step by step. The server helper and the first story come
// first; then the other helpers, the other stories, the real main in a child
// process, and the benchmarks at the end.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// startServer serves a fresh room; change lets a test lower its limits first.
// Server log lines are narrated into the test's log.
func startServer(t testing.TB, change func(*room)) (*room, *httptest.Server) {
	t.Helper()
	r := newRoom()
	r.logf = func(format string, args ...any) { t.Logf("server: "+format, args...) }
	if change != nil {
		r.mu.Lock() // the room's clock may already be reading its limits
		change(r)
		r.mu.Unlock()
	}
	srv := httptest.NewUnstartedServer(r.routes())
	srv.Listener = &connCounter{Listener: srv.Listener} // see TestShutdownClosesEveryConnection
	srv.Start()
	t.Cleanup(func() {
		srv.Close()
		r.shutdown() // returns once every connection and goroutine of the room is done
	})
	return r, srv
}

// The first story: one message, every client, the sender too.
func TestMessageReachesEveryoneIncludingSender(t *testing.T) {
	_, srv := startServer(t, nil)
	users := joinRoom(t, srv, "alice", "bob", "carol")
	alice, bob, carol := users[0], users[1], users[2]

	bob.say("hello, room")
	for _, c := range []*testClient{alice, bob, carol} {
		c.expect(msg(2, "hello, room"))
	}
}

// ---- Helpers: chat users ----

func wsURL(srv *httptest.Server) string { return "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws" }

// A testClient is one chat user, with a name for the story the test tells.
type testClient struct {
	t       testing.TB
	name    string
	conn    *websocket.Conn
	pending []string // the rest of the last frame read, one event per line
}

func dial(t testing.TB, srv *httptest.Server, name string) *testClient {
	t.Helper()
	conn, err := websocket.Dial(wsURL(srv), "", srv.URL)
	if err != nil {
		t.Fatalf("%s could not connect: %v", name, err)
	}
	t.Cleanup(func() { conn.Close() })
	return &testClient{t: t, name: name, conn: conn}
}

// joinRoom connects one client per name, in order, to a fresh room, checking
// that each gets its hello and that everyone already there hears of its join.
func joinRoom(t testing.TB, srv *httptest.Server, names ...string) []*testClient {
	t.Helper()
	var users []*testClient
	for i, name := range names {
		u := dial(t, srv, name)
		u.expect(hello(i+1, i+1))
		for _, earlier := range users {
			earlier.expect(join(i+1, i+1))
		}
		users = append(users, u)
	}
	return users
}

// read returns the next event, waiting at most 5 s. It checks the format on
// the way: one JSON object per line, with no field the protocol lacks.
func (tc *testClient) read() (event, error) {
	line, err := tc.readLine()
	if err != nil {
		return event{}, err
	}
	var ev event
	dec := json.NewDecoder(strings.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&ev); err != nil {
		return event{}, fmt.Errorf("%s: bad line %q: %v", tc.name, line, err)
	}
	return ev, nil
}

// readLine returns the next event as the bytes that came.
func (tc *testClient) readLine() (string, error) {
	if len(tc.pending) == 0 {
		tc.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		var frame string
		if err := websocket.Message.Receive(tc.conn, &frame); err != nil {
			return "", fmt.Errorf("%s: reading: %w", tc.name, err)
		}
		tc.pending = strings.Split(frame, "\n")
	}
	line := tc.pending[0]
	tc.pending = tc.pending[1:]
	return line, nil
}

// expect reads the next event and fails unless it is want.
func (tc *testClient) expect(want event) {
	tc.t.Helper()
	got, err := tc.read()
	if err != nil {
		tc.t.Fatal(err)
	}
	if !got.is(want) {
		tc.t.Fatalf("%s got %+v, want %+v", tc.name, got, want)
	}
	tc.t.Logf("%s received %s", tc.name, short(strings.TrimSpace(string(encode(got)))))
}

// short keeps a long text from filling the test's log.
func short(s string) string {
	if len(s) <= 100 {
		return s
	}
	return fmt.Sprintf("%s… (%d bytes)", s[:60], len(s))
}

func (tc *testClient) say(text string) {
	tc.t.Helper()
	if err := websocket.Message.Send(tc.conn, text); err != nil {
		tc.t.Fatalf("%s could not send: %v", tc.name, err)
	}
	tc.t.Logf("%s sends %s", tc.name, short(fmt.Sprintf("%q", text)))
}

// expectClosed fails unless the server closes this client's connection.
func (tc *testClient) expectClosed() {
	tc.t.Helper()
	ev, err := tc.read()
	if err == nil {
		tc.t.Fatalf("%s: want the connection closed, got %+v", tc.name, ev)
	}
	tc.t.Logf("%s: connection closed by the server (%v)", tc.name, err)
}

// is reports whether ev is want. A want with no message id or run matches
// any: the stories that care name them.
func (ev event) is(want event) bool {
	if want.ID == 0 {
		ev.ID = 0
	}
	if want.Run == "" {
		ev.Run = ""
	}
	return ev == want
}

func hello(uid, online int) event { return event{Type: "hello", UID: uid, Online: online} }
func join(uid, online int) event  { return event{Type: "join", UID: uid, Online: online} }
func leave(uid, online int) event { return event{Type: "leave", UID: uid, Online: online} }
func msg(uid int, text string) event {
	return event{Type: "msg", UID: uid, Msg: text}
}

// ---- Helpers: raw WebSocket ----

// rawHandshake opens a WebSocket by hand, so a test can choose the Host and
// Origin headers (x/net's client always sends an Origin), add header lines,
// and see every byte of the reply. An empty host means the address dialled.
func rawHandshake(t testing.TB, addr, host, origin string, headers ...string) (*http.Response, net.Conn, *bufio.Reader) {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if host == "" {
		host = addr
	}
	req := "GET /ws HTTP/1.1\r\nHost: " + host + "\r\n" +
		"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
	if origin != "" {
		req += "Origin: " + origin + "\r\n"
	}
	for _, h := range headers {
		req += h + "\r\n"
	}
	if _, err := io.WriteString(conn, req+"\r\n"); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	return resp, conn, br
}

// clientFrame is one short masked frame, as a browser sends it.
func clientFrame(opcode byte, payload string) []byte {
	mask := []byte{1, 2, 3, 4}
	frame := append([]byte{0x80 | opcode, 0x80 | byte(len(payload))}, mask...) // under 126 bytes
	for i := range len(payload) {
		frame = append(frame, payload[i]^mask[i%4])
	}
	return frame
}

// readRawFrame reads one server frame (servers never mask) as opcode and payload.
func readRawFrame(br *bufio.Reader) (opcode byte, payload []byte, err error) {
	var head [2]byte
	if _, err := io.ReadFull(br, head[:]); err != nil {
		return 0, nil, err
	}
	n := uint64(head[1] & 0x7f)
	if n >= 126 {
		ext := make([]byte, 2)
		if n == 127 {
			ext = make([]byte, 8)
		}
		if _, err := io.ReadFull(br, ext); err != nil {
			return 0, nil, err
		}
		n = 0
		for _, b := range ext {
			n = n<<8 | uint64(b)
		}
	}
	payload = make([]byte, n)
	_, err = io.ReadFull(br, payload)
	return head[0] & 0x0f, payload, err
}

// readUntilClose reads raw frames until a close frame, and fails if the
// connection ends without one.
func readUntilClose(br *bufio.Reader) error {
	for {
		opcode, _, err := readRawFrame(br)
		if err != nil {
			return fmt.Errorf("connection ended without a close frame: %w", err)
		}
		if opcode == websocket.CloseFrame {
			return nil
		}
	}
}

// ---- Helpers: looking inside the server ----

// online says how many clients the room holds.
func (r *room) online() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.clients)
}

// serverSide is the room's client for the user with this id, or nil.
func (r *room) serverSide(uid int) *client {
	r.mu.Lock()
	defer r.mu.Unlock()
	for c := range r.clients {
		if c.uid == uid {
			return c
		}
	}
	return nil
}

// queued says how many events wait for that user's writer to take them.
func (r *room) queued(uid int) int {
	c := r.serverSide(uid)
	if c == nil {
		return 0
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.queue)
}

// A connCounter is a listener that counts the server's open connections,
// WebSockets included: net/http forgets a connection once it hands it over.
type connCounter struct {
	net.Listener
	open atomic.Int64
}

type countedConn struct {
	net.Conn
	closed sync.Once
	open   *atomic.Int64
}

func (l *connCounter) Accept() (net.Conn, error) {
	conn, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.open.Add(1)
	return &countedConn{Conn: conn, open: &l.open}, nil
}

func (c *countedConn) Close() error {
	c.closed.Do(func() { c.open.Add(-1) })
	return c.Conn.Close()
}

// logRecorder collects the server's log lines, so a test can check why a
// client left.
type logRecorder struct {
	t     testing.TB
	mu    sync.Mutex
	lines []string
}

func (l *logRecorder) logf(format string, args ...any) {
	line := fmt.Sprintf(format, args...)
	l.t.Log("server: " + line)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, line)
}

func (l *logRecorder) contains(s string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.ContainsFunc(l.lines, func(line string) bool { return strings.Contains(line, s) })
}

// waitFor polls cond until it holds, failing after 10 s.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	timeout := time.After(10 * time.Second)
	for !cond() {
		select {
		case <-tick.C:
		case <-timeout:
			t.Fatalf("gave up waiting for %s", what)
		}
	}
}

// stallWriter has talker send 4 KB messages, reading each back, until at
// least n events wait for the user with id uid, who reads nothing: that
// user's socket buffers are full and its writer is blocked in a write. It
// returns how many messages talker sent, and how many events wait.
func stallWriter(t testing.TB, r *room, talker *testClient, uid, n int) (sent, waiting int) {
	t.Helper()
	for ; waiting < n; waiting = r.queued(uid) {
		if sent == 100_000 {
			t.Fatalf("user %d's writer never blocked", uid)
		}
		if err := websocket.Message.Send(talker.conn, fmt.Sprintf("%d %4000s", sent, ".")); err != nil {
			t.Fatal(err)
		}
		if _, err := talker.read(); err != nil {
			t.Fatal(err)
		}
		sent++
	}
	t.Logf("%s sent %d messages of 4 KB; %d of them wait for user %d", talker.name, sent, waiting, uid)
	return sent, waiting
}

// ---- HTTP ----

func TestPageAndRoutes(t *testing.T) {
	_, srv := startServer(t, nil)

	resp, err := http.Get(srv.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/html; charset=utf-8" {
		t.Fatalf("GET / = %d %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	if string(body) != string(indexHTML) || !strings.Contains(string(body), "<title>wschat</title>") {
		t.Fatalf("GET / did not serve the embedded page")
	}
	t.Logf("GET / serves the embedded page (%d bytes)", len(body))

	for _, tc := range []struct {
		method, path string
		want         int
	}{
		{"GET", "/nope", 404},
		{"GET", "/index.html", 404},
		{"POST", "/", 405},
		{"DELETE", "/", 405},
		{"POST", "/ws", 405},
		{"GET", "/ws", 400}, // no upgrade headers: not a WebSocket handshake
		{"GET", "/", 200},   // and the server carries on
	} {
		req, _ := http.NewRequest(tc.method, srv.URL+tc.path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", tc.method, tc.path, err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("%s %s = %d, want %d", tc.method, tc.path, resp.StatusCode, tc.want)
		}
	}
}

func TestOrigin(t *testing.T) {
	_, srv := startServer(t, nil)
	for _, tc := range []struct {
		name, origin string
		want         int
	}{
		{"another site", "http://evil.example", http.StatusForbidden},
		{"same host, other port", "http://127.0.0.1:1", http.StatusForbidden},
		{"the literal null origin", "null", http.StatusForbidden},
		{"same origin", srv.URL, http.StatusSwitchingProtocols},
		{"no origin (a command-line client)", "", http.StatusSwitchingProtocols},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, _, br := rawHandshake(t, srv.Listener.Addr().String(), "", tc.origin)
			if resp.StatusCode != tc.want {
				t.Fatalf("Origin %q: status %d, want %d", tc.origin, resp.StatusCode, tc.want)
			}
			if tc.want != http.StatusSwitchingProtocols {
				return
			}
			opcode, payload, err := readRawFrame(br)
			if err != nil || opcode != websocket.TextFrame || !strings.Contains(string(payload), `"type":"hello"`) {
				t.Fatalf("accepted, but no hello: opcode %d, %q, %v", opcode, payload, err)
			}
			t.Logf("Origin %q: accepted, server says %s", tc.origin, payload)
		})
	}
}

// A WebSocket's Host must be an IP address or one of this server's names. A
// page on another name that was re-pointed at this server (DNS rebinding)
// sends an Origin that matches its Host, and is refused all the same.
func TestHostMustBeThisServer(t *testing.T) {
	logs := &logRecorder{t: t}
	_, srv := startServer(t, func(r *room) { r.logf = logs.logf })
	addr := srv.Listener.Addr().String()
	_, port, _ := net.SplitHostPort(addr)
	hostname, err := os.Hostname()
	if err != nil {
		t.Fatal(err)
	}
	hostname = strings.TrimSuffix(hostname, ".local") // tried with and without
	for _, tc := range []struct {
		host string
		want int
	}{
		{addr, http.StatusSwitchingProtocols},
		{"[::1]:" + port, http.StatusSwitchingProtocols},
		{"localhost:" + port, http.StatusSwitchingProtocols},
		{hostname + ":" + port, http.StatusSwitchingProtocols},
		{strings.ToUpper(hostname) + ".local:" + port, http.StatusSwitchingProtocols},
		{"attacker.example:" + port, http.StatusForbidden},
		{"localhost.attacker.example:" + port, http.StatusForbidden},
	} {
		resp, _, _ := rawHandshake(t, addr, tc.host, "http://"+tc.host)
		if resp.StatusCode != tc.want {
			t.Fatalf("Host %q with the same Origin: status %d, want %d", tc.host, resp.StatusCode, tc.want)
		}
		t.Logf("Host %q: %s", tc.host, resp.Status)
	}
	if !logs.contains(`refused a WebSocket for Host "attacker.example:` + port + `": if that is this server, run it with -host attacker.example`) {
		t.Fatal("the refusal was not logged with a way to allow the name")
	}

	req, _ := http.NewRequest("GET", srv.URL+"/", nil)
	req.Host = "attacker.example"
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET / with another Host: %s, want the page: it holds no data", resp.Status)
	}
}

// ---- Presence ----

func TestHelloJoinLeave(t *testing.T) {
	_, srv := startServer(t, nil)
	alice := dial(t, srv, "alice")
	alice.expect(hello(1, 1))

	bob := dial(t, srv, "bob")
	bob.expect(hello(2, 2))
	alice.expect(join(2, 2)) // bob does not get his own join

	carol := dial(t, srv, "carol")
	carol.expect(hello(3, 3))
	alice.expect(join(3, 3))
	bob.expect(join(3, 3))

	t.Log("bob closes his tab")
	bob.conn.Close()
	alice.expect(leave(2, 2))
	carol.expect(leave(2, 2))
}

func TestIDsAreNeverReused(t *testing.T) {
	_, srv := startServer(t, nil)
	a := dial(t, srv, "user 1")
	a.expect(hello(1, 1))
	b := dial(t, srv, "user 2")
	b.expect(hello(2, 2))
	a.expect(join(2, 2))

	b.conn.Close()
	a.expect(leave(2, 1))

	// len(clients)+1 would hand out 2 again here.
	c := dial(t, srv, "the next user")
	c.expect(hello(3, 2))
	a.expect(join(3, 2))
	c.conn.Close()
	a.expect(leave(3, 1))
	d := dial(t, srv, "and the next")
	d.expect(hello(4, 2))
}

// ---- Messages and bad input ----

func TestMessagesAreTrimmedAndEmptyOnesIgnored(t *testing.T) {
	_, srv := startServer(t, nil)
	alice := dial(t, srv, "alice")
	alice.expect(hello(1, 1))

	alice.say("  \t hi there \n ")
	alice.expect(msg(1, "hi there"))
	alice.say("")
	alice.say(" \n\t ")
	alice.say("after the blanks")
	alice.expect(msg(1, "after the blanks")) // nothing came before it
}

func TestTextIsRelayedVerbatim(t *testing.T) {
	_, srv := startServer(t, nil)
	users := joinRoom(t, srv, "alice", "bob")
	alice, bob := users[0], users[1]

	for _, text := range []string{
		`<script>alert("hi")</script>`,
		`<img src=x onerror=alert(1)>`,
		`{"type":"msg","uid":1,"msg":"x"}`,
		`{"uid":2}` + "\n" + `{"type":"leave","uid":1}`, // a newline inside a message cannot split the frame
		"héllo wörld, 世界, Привет 👋🏽",
		`back\slash "quotes" & ampersand`,
	} {
		alice.say(text)
		bob.expect(msg(1, text))
	}

	// HTML travels as it is, not escaped as \u003c: the page shows it as text.
	alice.say("<b>&</b>")
	bob.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	var raw string
	if err := websocket.Message.Receive(bob.conn, &raw); err != nil || !strings.Contains(raw, `"msg":"<b>&</b>"`) {
		t.Fatalf("<b>&</b> arrived as %q (%v)", raw, err)
	}
	t.Logf("bob received %s", raw)

	// Invalid UTF-8 must still come out as valid JSON: the bad byte becomes U+FFFD.
	alice.say("a\xffb")
	bob.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	var frame []byte
	if err := websocket.Message.Receive(bob.conn, &frame); err != nil {
		t.Fatal(err)
	}
	var ev event
	if !json.Valid(frame) || json.Unmarshal(frame, &ev) != nil || ev.Msg != "a\uFFFDb" {
		t.Fatalf("invalid UTF-8 relayed as %q", frame)
	}
	t.Logf("bob received %s", frame)
}

func TestOversizedFrameClosesOnlyItsSender(t *testing.T) {
	_, srv := startServer(t, nil)
	users := joinRoom(t, srv, "alice", "mallory")
	alice, mallory := users[0], users[1]

	exactly := strings.Repeat("x", maxMessageBytes)
	mallory.say(exactly) // at the limit: fine
	alice.expect(msg(2, exactly))
	mallory.expect(msg(2, exactly))

	// The server closes the connection without reading the frame's payload,
	// so mallory's own write may already fail with a reset.
	t.Logf("mallory sends %d bytes", len(exactly)+1)
	websocket.Message.Send(mallory.conn, exactly+"y")
	mallory.expectClosed()
	alice.expect(leave(2, 1))

	alice.say("still here")
	alice.expect(msg(1, "still here"))
}

func TestBinaryFrameClosesOnlyItsSender(t *testing.T) {
	_, srv := startServer(t, nil)
	users := joinRoom(t, srv, "alice", "bot")
	alice, bot := users[0], users[1]

	if err := websocket.Message.Send(bot.conn, []byte{0, 1, 2}); err != nil {
		t.Fatal(err)
	}
	bot.expectClosed()
	alice.expect(leave(2, 1))
}

// x/net answers a ping inside the read loop, with whatever write deadline the
// connection has then: a ping long after the last message must still get its
// pong, and the client must stay.
func TestPingIsAnsweredAfterAQuietSpell(t *testing.T) {
	_, srv := startServer(t, func(r *room) { r.writeTimeout = 100 * time.Millisecond })
	resp, conn, br := rawHandshake(t, srv.Listener.Addr().String(), "", "")
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatal(resp.Status)
	}
	if _, hello, err := readRawFrame(br); err != nil || !strings.Contains(string(hello), `"hello"`) {
		t.Fatalf("no hello: %q %v", hello, err)
	}
	quietUntil := time.Now().Add(3 * 100 * time.Millisecond) // well past the hello's write deadline
	waitFor(t, "a quiet spell", func() bool { return time.Now().After(quietUntil) })

	conn.Write(clientFrame(websocket.PingFrame, "are you there?"))
	if opcode, payload, err := readRawFrame(br); err != nil || opcode != websocket.PongFrame || string(payload) != "are you there?" {
		t.Fatalf("after a quiet spell, a ping got opcode %d %q (%v), want its pong", opcode, payload, err)
	}
	conn.Write(clientFrame(websocket.TextFrame, "still here"))
	if _, payload, err := readRawFrame(br); err != nil || !strings.Contains(string(payload), `"msg":"still here"`) {
		t.Fatalf("after the pong: %q %v", payload, err)
	}
	t.Log("the ping got its pong, and the client is still in the room")
}

// The server speaks no subprotocol, so it names none, whatever a client
// offers: RFC 6455 lets it accept without one. x/net alone would echo a
// single offer back, claiming to speak it, and refuse two with 400.
func TestEverySubprotocolIsDeclined(t *testing.T) {
	_, srv := startServer(t, nil)
	for _, offer := range []string{"chat", "chat, superchat", " , ,,", `;="x`} {
		resp, _, br := rawHandshake(t, srv.Listener.Addr().String(), "", "", "Sec-WebSocket-Protocol: "+offer)
		if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Sec-WebSocket-Protocol") != "" {
			t.Fatalf("offered %q: %s, Sec-WebSocket-Protocol %q; want 101 and none", offer, resp.Status, resp.Header.Get("Sec-WebSocket-Protocol"))
		}
		if _, hello, err := readRawFrame(br); err != nil || !strings.Contains(string(hello), `"hello"`) {
			t.Fatalf("offered %q: no hello: %q %v", offer, hello, err)
		}
		t.Logf("offered %q: 101, no subprotocol named, hello received", offer)
	}
}

// After pingInterval with nothing written to it, a client gets a ping, so
// that a proxy between it and the server does not cut the quiet connection.
// The test runs the room's clock by hand, at made-up times.
func TestQuietClientIsPinged(t *testing.T) {
	r, srv := startServer(t, nil)
	resp, conn, br := rawHandshake(t, srv.Listener.Addr().String(), "", "")
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatal(resp.Status)
	}
	if _, hello, err := readRawFrame(br); err != nil || !strings.Contains(string(hello), `"hello"`) {
		t.Fatalf("no hello: %q %v", hello, err)
	}
	clockAt := func(later time.Duration) {
		t.Logf("the room's clock, %v from now", later)
		r.mu.Lock()
		r.checkWritersLocked(time.Now().Add(later))
		r.mu.Unlock()
	}
	expectFrame := func(opcode byte, contains string) {
		t.Helper()
		got, payload, err := readRawFrame(br)
		if err != nil || got != opcode || !strings.Contains(string(payload), contains) {
			t.Fatalf("got opcode %d %q (%v), want opcode %d with %q", got, payload, err, opcode, contains)
		}
	}

	clockAt(r.pingInterval)
	expectFrame(websocket.PingFrame, "")
	t.Log("a ping, which the client does not answer")
	conn.Write(clientFrame(websocket.TextFrame, "still here"))
	expectFrame(websocket.TextFrame, `"msg":"still here"`)

	t.Log("as if that message had been the first write for 20 s: the clock 15 s after it")
	onServer := r.serverSide(1)
	onServer.mu.Lock()
	onServer.lastWrite = onServer.lastWrite.Add(-20 * time.Second)
	onServer.mu.Unlock()
	conn.Write(clientFrame(websocket.TextFrame, "and again"))
	expectFrame(websocket.TextFrame, `"msg":"and again"`)
	clockAt(15 * time.Second)
	onServer.mu.Lock()
	pingDue := onServer.pingDue
	onServer.mu.Unlock()
	conn.Write(clientFrame(websocket.TextFrame, "no ping"))
	if expectFrame(websocket.TextFrame, `"msg":"no ping"`); pingDue {
		t.Fatal("a ping was asked for 15 s after a write")
	}
	t.Log("no ping: the client heard something 15 s ago")
}

// A client that floods pings and reads nothing piles up pongs, which the
// server's read loop writes, competing with the writer for x/net's write
// lock. The others must not notice; the pinger goes once the room's clock
// finds a write to it in progress for writeTimeout, and its goroutines end.
func TestPingingWithoutReadingIsHarmless(t *testing.T) {
	logs := &logRecorder{t: t}
	r, srv := startServer(t, func(r *room) { r.floodInterval, r.logf = 0, logs.logf })
	alice := joinRoom(t, srv, "alice")[0]
	resp, pinger, _ := rawHandshake(t, srv.Listener.Addr().String(), "", "")
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatal(resp.Status)
	}
	alice.expect(join(2, 2))
	pinger.(*net.TCPConn).SetReadBuffer(4096) // a few pongs fill it
	t.Log("the pinger sends pings, 125 bytes each, and reads nothing; alice chats")
	unread := make(chan struct{}) // closed once the server stops reading the pinger
	go func() {
		defer close(unread)
		pings := bytes.Repeat(clientFrame(websocket.PingFrame, strings.Repeat("p", 125)), 100)
		for {
			pinger.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
			if _, err := pinger.Write(pings); err != nil {
				return // 200 ms without room: the server has stopped reading for now
			}
		}
	}()
	for i := 0; ; i++ {
		alice.say(fmt.Sprint(i))
		alice.expect(msg(1, fmt.Sprint(i)))
		select {
		case <-unread:
		case <-time.After(time.Millisecond):
			continue
		}
		break
	}
	stuck := func() bool { // writing, with more to write
		c := r.serverSide(2)
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.writing && len(c.queue) > 0
	}
	for i := 0; !stuck(); i++ {
		if i == 10_000 {
			t.Fatal("the pinger's writer never got stuck")
		}
		alice.say("and " + fmt.Sprint(i))
		alice.expect(msg(1, "and "+fmt.Sprint(i)))
	}
	t.Log("a write to the pinger is in progress; the room's clock comes round writeTimeout later")
	r.mu.Lock()
	r.checkWritersLocked(time.Now().Add(r.writeTimeout))
	r.mu.Unlock()
	alice.expect(leave(2, 1))
	waitFor(t, "the pinger's read loop to end", func() bool { return logs.contains("user 2 left: too slow: a write blocked") })
	alice.say("still here")
	alice.expect(msg(1, "still here"))
}

// ---- Delivery guarantees ----

// A newcomer is sent what was said before it came: hello says how many
// messages follow it, and they are the bytes everyone received, oldest
// first. Joins and leaves are not kept. Then the newcomer is live.
func TestNewcomerIsSentTheHistory(t *testing.T) {
	_, srv := startServer(t, nil)
	users := joinRoom(t, srv, "alice", "bob")
	alice, bob := users[0], users[1]
	var heard []string
	for i, text := range []string{"one", "two", "three"} {
		bob.say(text)
		line, err := alice.readLine()
		if err != nil || line != fmt.Sprintf(`{"type":"msg","id":%d,"uid":2,"msg":%q}`, i+1, text) {
			t.Fatalf("alice got %q (%v)", line, err)
		}
		heard = append(heard, line)
	}
	t.Log("bob leaves; carol comes")
	bob.conn.Close()
	alice.expect(leave(2, 1))
	carol := dial(t, srv, "carol")
	carol.expect(event{Type: "hello", UID: 3, Online: 2, History: 3})
	for _, want := range heard {
		if line, err := carol.readLine(); err != nil || line != want {
			t.Fatalf("carol got %q (%v), want %q, as alice had it", line, err, want)
		}
	}
	t.Logf("carol received the 3 messages byte for byte, and no join or leave")
	alice.expect(join(3, 2))
	alice.say("now live")
	carol.expect(msg(1, "now live"))
}

// hello's run is the same for everyone in one run of the server, and new
// after a restart: a page that reconnects can tell that its old user ids and
// message ids now mean others.
func TestRunChangesWhenTheServerRestarts(t *testing.T) {
	runOf := func(srv *httptest.Server, name string) string {
		ev, err := dial(t, srv, name).read()
		if err != nil || ev.Type != "hello" || ev.Run == "" {
			t.Fatalf("%s: hello %+v, %v", name, ev, err)
		}
		return ev.Run
	}
	_, first := startServer(t, nil)
	_, restarted := startServer(t, nil)
	alice, bob, carol := runOf(first, "alice"), runOf(first, "bob"), runOf(restarted, "carol")
	if alice != bob || alice == carol {
		t.Fatalf("runs: alice %q, bob %q on the same server; carol %q after a restart", alice, bob, carol)
	}
	t.Logf("one server: run %s for alice and bob; after a restart, %s", alice, carol)
}

// The room keeps its last historySize messages, and no more.
func TestHistoryKeepsTheLast100(t *testing.T) {
	_, srv := startServer(t, func(r *room) { r.floodInterval = 0 })
	alice := joinRoom(t, srv, "alice")[0]
	for i := range 123 {
		alice.say(fmt.Sprint(i))
		alice.expect(event{Type: "msg", ID: i + 1, UID: 1, Msg: fmt.Sprint(i)})
	}
	bob := dial(t, srv, "bob")
	bob.expect(event{Type: "hello", UID: 2, Online: 2, History: 100})
	for i := 23; i < 123; i++ {
		bob.expect(event{Type: "msg", ID: i + 1, UID: 1, Msg: fmt.Sprint(i)})
	}
}

// A newcomer who joins while someone is talking hears every message once,
// in order: the history and then the live ones, nothing missing between.
func TestJoiningMidConversationMissesNothing(t *testing.T) {
	const total = 1000
	_, srv := startServer(t, func(r *room) { r.floodBurst, r.floodInterval = 1, time.Millisecond })
	alice := joinRoom(t, srv, "alice")[0]
	t.Logf("alice sends the numbers 0 to %d; bob joins while she does", total-1)
	sent := make(chan error, 1)
	go func() {
		for i := range total {
			if err := websocket.Message.Send(alice.conn, fmt.Sprint(i)); err != nil {
				sent <- err
				return
			}
		}
		sent <- nil
	}()
	for i := range 50 {
		alice.expect(msg(1, fmt.Sprint(i)))
	}
	bob := dial(t, srv, "bob")
	hello, err := bob.read()
	if err != nil || hello.Type != "hello" {
		t.Fatalf("bob: %+v %v", hello, err)
	}
	first, next := -1, -1
	for next != total-1 {
		ev, err := bob.read()
		if err != nil {
			t.Fatal(err)
		}
		n, _ := strconv.Atoi(ev.Msg)
		if first == -1 {
			first = n
		}
		if ev.Type != "msg" || (next != -1 && n != next+1) || (hello.History < historySize && first != 0) {
			t.Fatalf("bob got %+v after %d (history %d from %d)", ev, next, hello.History, first)
		}
		next = n
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	t.Logf("bob heard %d to %d as history, then %d to %d live: every number once, in order",
		first, first+hello.History-1, first+hello.History, total-1)
}

// A client that fell behind catches up on every event, in order, in frames
// of at most maxFrameBytes, or of one event that alone is larger: clients cap
// what they read in one frame (coder/websocket at 32 KiB, Python's websockets
// at 1 MiB). Here sleepy stops reading until its writer is stuck; alice's 4 KB
// messages pile up, one of them 4096 control characters, 24 KB as JSON.
func TestCatchingUpComesInCappedFrames(t *testing.T) {
	r, srv := startServer(t, func(r *room) { r.floodInterval = 0 })
	users := joinRoom(t, srv, "alice", "sleepy")
	alice, sleepy := users[0], users[1]
	sent, _ := stallWriter(t, r, alice, 2, 40)
	big := strings.Repeat("\x01", maxMessageBytes)
	alice.say(big)
	alice.expect(msg(1, big))
	for range 10 {
		alice.say(fmt.Sprintf("%d %4000s", sent, "."))
		alice.read()
		sent++
	}

	t.Log("sleepy reads again")
	var largest, shared int
	for next := 0; next < sent; {
		sleepy.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		var frame string
		if err := websocket.Message.Receive(sleepy.conn, &frame); err != nil {
			t.Fatalf("sleepy, at message %d of %d: %v", next, sent, err)
		}
		lines := strings.Split(frame, "\n")
		if len(frame) > maxFrameBytes && len(lines) > 1 {
			t.Fatalf("a frame of %d bytes with %d events", len(frame), len(lines))
		}
		largest = max(largest, len(frame))
		if len(lines) > 1 {
			shared++
		}
		for _, line := range lines {
			var ev event
			if err := json.Unmarshal([]byte(line), &ev); err != nil {
				t.Fatal(err)
			}
			if ev.Msg == big {
				continue
			}
			if !strings.HasPrefix(ev.Msg, fmt.Sprint(next, " ")) {
				t.Fatalf("got %.60q, want alice's message %d", line, next)
			}
			next++
		}
	}
	if shared == 0 {
		t.Fatal("no frame carried more than one event")
	}
	t.Logf("sleepy caught up on all %d messages, in order; largest frame %d bytes; %d frames carried several events", sent+1, largest, shared)
}

func TestSameOrderEverywhere(t *testing.T) {
	const clients, perClient = 8, 50
	_, srv := startServer(t, func(r *room) { r.floodInterval = 0 }) // no flood limit
	var names []string
	for i := range clients {
		names = append(names, fmt.Sprintf("user %d", i+1))
	}
	users := joinRoom(t, srv, names...)

	t.Logf("%d users each send %d messages, all at once", clients, perClient)
	received := make([][]event, clients)
	var wg sync.WaitGroup
	errs := make(chan error, 2*clients)
	for i, u := range users {
		wg.Go(func() {
			for j := range perClient {
				if err := websocket.Message.Send(u.conn, fmt.Sprintf("%d", j)); err != nil {
					errs <- err
					return
				}
			}
		})
		wg.Go(func() {
			for range clients * perClient {
				ev, err := u.read()
				if err != nil {
					errs <- err
					return
				}
				received[i] = append(received[i], ev)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}

	for i := range users {
		if !slices.Equal(received[i], received[0]) {
			t.Fatalf("user %d saw a different order than user 1", i+1)
		}
	}
	next := make(map[int]int) // each sender's messages arrive in the order sent
	for i, ev := range received[0] {
		if ev.ID != i+1 {
			t.Fatalf("message %d has id %d: ids must count 1, 2, 3… in the order everyone sees", i+1, ev.ID)
		}
		if ev.Type != "msg" || ev.Msg != fmt.Sprint(next[ev.UID]) {
			t.Fatalf("from user %d: got %+v, want message %d", ev.UID, ev, next[ev.UID])
		}
		next[ev.UID]++
	}
	t.Logf("all %d users received the same %d messages in the same order", clients, len(received[0]))
}

// A client that never reads must not hold up anyone else, and must be
// disconnected (not silently skipped), whether its queue fills up first or a
// write to it blocks first.
func TestSlowClientIsDisconnectedWithoutDelayingOthers(t *testing.T) {
	for _, tc := range []struct {
		name         string
		queueLimit   int
		writeTimeout time.Duration
		reason       string
	}{
		{"queue full", 20, time.Hour, "too slow: 20 events waiting"},
		{"write blocked", 1 << 30, 200 * time.Millisecond, "too slow: a write blocked for 200ms"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			logs := &logRecorder{t: t}
			_, srv := startServer(t, func(r *room) {
				r.queueLimit, r.writeTimeout, r.floodInterval = tc.queueLimit, tc.writeTimeout, 0
				r.logf = logs.logf
			})
			alice := dial(t, srv, "alice")
			alice.expect(hello(1, 1))
			dial(t, srv, "sleepy").expect(hello(2, 2)) // and never reads again
			alice.expect(join(2, 2))

			// alice sends big messages, one at a time, until sleepy is gone.
			// Each must reach her, in order, while sleepy is still connected.
			t.Log("alice sends 4 KB messages; sleepy reads none of them")
			gone := false
			for n := 0; !gone; n++ {
				if n == 100_000 {
					t.Fatal("sleepy was never disconnected")
				}
				if err := websocket.Message.Send(alice.conn, fmt.Sprintf("%d %4000s", n, ".")); err != nil {
					t.Fatal(err)
				}
				for {
					ev, err := alice.read()
					if err != nil {
						t.Fatal(err)
					}
					if ev.is(leave(2, 1)) {
						t.Logf("alice received %s after %d of her messages", strings.TrimSpace(string(encode(ev))), n)
						gone = true
						continue
					}
					if ev.Type != "msg" || !strings.HasPrefix(ev.Msg, fmt.Sprint(n, " ")) {
						t.Fatalf("alice's message %d: got %.60v", n, ev)
					}
					break
				}
			}
			waitFor(t, "the log to say why sleepy left", func() bool { return logs.contains("user 2 left: " + tc.reason) })
			alice.say("still here")
			alice.expect(msg(1, "still here"))
		})
	}
}

// A message read from a client that the room has just dropped is not
// broadcast: everyone has heard its leave already. The server reads both of
// mallory's frames into its buffer at once, relays the first, and holds the
// second for one flood interval; the room drops mallory meanwhile.
func TestDroppedClientSpeaksNoMore(t *testing.T) {
	r, srv := startServer(t, func(r *room) { r.floodBurst, r.floodInterval = 1, 500*time.Millisecond })
	alice := joinRoom(t, srv, "alice")[0]
	resp, mallory, br := rawHandshake(t, srv.Listener.Addr().String(), "", "")
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatal(resp.Status)
	}
	alice.expect(join(2, 2))

	t.Log("mallory sends two messages in one TCP write")
	mallory.Write(append(clientFrame(websocket.TextFrame, "first"), clientFrame(websocket.TextFrame, "second")...))
	alice.expect(msg(2, "first"))
	onServer := r.serverSide(2)
	r.mu.Lock()
	r.dropLocked(onServer, "dropped by the test")
	r.mu.Unlock()
	alice.expect(leave(2, 1))
	for {
		if _, _, err := readRawFrame(br); err != nil {
			break // the server closed mallory's connection: it is done with both frames
		}
	}
	alice.say("still here")
	alice.expect(msg(1, "still here")) // and not mallory's "second"
}

// The log is written outside every lock: a log that blocks (a paused
// terminal, a full pipe) holds up only the goroutine writing it, never the
// room. Here the log of carol's join, and then of bob's leave, never returns.
func TestBlockedLogDoesNotStallTheRoom(t *testing.T) {
	unblock := make(chan struct{})
	_, srv := startServer(t, func(r *room) {
		r.logf = func(format string, args ...any) {
			line := fmt.Sprintf(format, args...)
			t.Log("server: " + line)
			if strings.HasPrefix(line, "user 3 joined") || strings.HasPrefix(line, "user 2 left") {
				t.Log("(the log blocks)")
				<-unblock
			}
		}
	})
	t.Cleanup(func() { close(unblock) }) // before the server's cleanup, which waits for the log
	users := joinRoom(t, srv, "alice", "bob", "carol")
	alice, bob, carol := users[0], users[1], users[2]

	bob.conn.Close()
	alice.expect(leave(2, 2))
	carol.expect(leave(2, 2))
	alice.say("still talking")
	alice.expect(msg(1, "still talking"))
	carol.expect(msg(1, "still talking"))
}

func TestNoGoroutineIsLeftBehind(t *testing.T) {
	before := runtime.NumGoroutine()
	r, srv := startServer(t, nil)
	var users []*testClient
	for i := range 5 {
		u := dial(t, srv, fmt.Sprintf("user %d", i+1))
		u.expect(hello(i+1, i+1))
		users = append(users, u)
	}
	users[0].say("bye")
	for _, u := range users {
		for ev, err := u.read(); !ev.is(msg(1, "bye")); ev, err = u.read() {
			if err != nil {
				t.Fatal(err)
			}
		}
		u.conn.Close()
	}
	waitFor(t, "the room to be empty", func() bool { return r.online() == 0 })
	srv.Close()
	r.shutdown() // and the room's clock stops
	waitFor(t, "every goroutine to end", func() bool { return runtime.NumGoroutine() <= before })
	t.Logf("goroutines: %d before the server started, %d after everyone left", before, runtime.NumGoroutine())
}

// ---- Shutting down ----

// Shutting down sends every healthy client a close frame, is not held up by a
// client whose writer is blocked on a full socket, and returns only once
// every connection is closed.
func TestShutdownClosesEveryConnection(t *testing.T) {
	r, srv := startServer(t, func(r *room) { r.floodInterval, r.writeTimeout = 0, time.Hour })
	users := joinRoom(t, srv, "alice", "sleepy") // sleepy never reads
	resp, _, rawBr := rawHandshake(t, srv.Listener.Addr().String(), "", "")
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatal(resp.Status)
	}
	rawClosed := make(chan error, 1)
	go func() { rawClosed <- readUntilClose(rawBr) }() // a healthy reader that sees raw frames
	users[0].expect(join(3, 3))
	stallWriter(t, r, users[0], 2, 100)

	start := time.Now()
	srv.Close()
	r.shutdown()
	took := time.Since(start)
	if open := srv.Listener.(*connCounter).open.Load(); open != 0 {
		t.Fatalf("shutdown returned with %d connections still open", open)
	}
	t.Logf("shutdown took %v, and every connection was closed when it returned", took.Round(time.Millisecond))
	if took > 2*time.Second {
		t.Fatalf("shutdown took %v, want at most 2s", took)
	}
	if err := <-rawClosed; err != nil {
		t.Fatal(err)
	}
	t.Log("the healthy client received a close frame")
}

// A flooder is slowed down to the limit, not disconnected and not dropped,
// and everyone else keeps talking meanwhile.
func TestFloodIsThrottledNotDropped(t *testing.T) {
	const burst, interval, total = 20, 5 * time.Millisecond, 200
	_, srv := startServer(t, func(r *room) { r.floodBurst, r.floodInterval = burst, interval })
	users := joinRoom(t, srv, "flooder", "alice")
	flooder, alice := users[0], users[1]

	t.Logf("the flooder sends %d messages at full speed; the limit is %d at once, then one per %v", total, burst, interval)
	start := time.Now()
	sent := make(chan error, 1)
	go func() {
		for i := range total {
			if err := websocket.Message.Send(flooder.conn, fmt.Sprint(i)); err != nil {
				sent <- err
				return
			}
		}
		sent <- nil
	}()

	// Once the burst is spent and the flooder is held back, alice speaks.
	const word = "can I get a word in?"
	var saidAt time.Time
	heardAfter := time.Duration(-1)
	for i := 0; i < total; {
		ev, err := alice.read()
		switch {
		case err != nil:
			t.Fatal(err)
		case ev.is(msg(2, word)):
			heardAfter = time.Since(saidAt)
			t.Logf("alice's message came back after %v, with %d of the flood still to come", heardAfter.Round(time.Millisecond), total-i)
		case ev.is(msg(1, fmt.Sprint(i))):
			i++
			if i == burst+10 {
				alice.say(word)
				saidAt = time.Now()
			}
		default:
			t.Fatalf("alice got %+v, want the flood's message %d", ev, i)
		}
	}
	elapsed := time.Since(start)
	if heardAfter < 0 || heardAfter > 500*time.Millisecond {
		t.Fatalf("alice's message took %v (negative: not before the flood ended), want it within 0.5 s", heardAfter)
	}
	if minimum := (total - burst) * interval; elapsed < minimum {
		t.Fatalf("all %d messages arrived in %v: faster than the limit allows (%v)", total, elapsed, minimum)
	}
	t.Logf("all %d of the flood arrived, in order, over %v", total, elapsed.Round(time.Millisecond))

	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	for i := 0; i < total; { // the flooder is still connected and got everything too
		ev, err := flooder.read()
		if err != nil {
			t.Fatalf("the flooder lost its connection: %v", err)
		}
		if ev.is(msg(1, fmt.Sprint(i))) {
			i++
		} else if !ev.is(msg(2, word)) {
			t.Fatalf("the flooder got %+v, want its message %d", ev, i)
		}
	}
	flooder.say("done")
	flooder.expect(msg(1, "done"))
}

// Every frame counts against the limit, even one that is ignored: here three
// empty frames spend the whole burst, so the message after them must wait
// one interval.
func TestEmptyFramesCountAgainstTheFloodLimit(t *testing.T) {
	const interval = 300 * time.Millisecond
	_, srv := startServer(t, func(r *room) { r.floodBurst, r.floodInterval = 3, interval })
	alice := joinRoom(t, srv, "alice")[0]
	start := time.Now()
	for range 3 {
		alice.say("")
	}
	alice.say("after three empty frames")
	alice.expect(msg(1, "after three empty frames"))
	if took := time.Since(start); took < interval {
		t.Fatalf("the message came back after %v: the empty frames cost nothing", took)
	} else {
		t.Logf("the message waited %v for the bucket to refill", took.Round(time.Millisecond))
	}
}

// ---- The real main, in a child process ----

// TestMain lets a test run the real main in a child process: the test binary
// re-executes itself with WSCHAT_RUN_MAIN=1 and the flags main should see.
func TestMain(m *testing.M) {
	if os.Getenv("WSCHAT_RUN_MAIN") == "1" {
		go collectOnRequest()
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// collectOnRequest lets BenchmarkIdleConnections tell live memory from
// garbage in the child: each line on stdin asks for a full collection, and
// what is left goes back on stdout.
func collectOnRequest() {
	for lines := bufio.NewScanner(os.Stdin); lines.Scan(); {
		debug.FreeOSMemory() // collect everything, and give freed memory back to the OS
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		fmt.Printf("collected: heap %d stacks %d\n", m.HeapInuse, m.StackInuse)
	}
}

// A mainProcess is the real main, running in a child process.
type mainProcess struct {
	cmd    *exec.Cmd
	addr   string         // the first address it printed
	stdin  io.Writer      // see collectOnRequest
	stdout *bufio.Scanner // the rest of what it prints
}

func startMain(t testing.TB, args ...string) *mainProcess {
	t.Helper()
	p := &mainProcess{cmd: exec.Command(os.Args[0], args...)}
	// The race detector sleeps 1 s before a process exits; that is not main's time.
	p.cmd.Env = append(os.Environ(), "WSCHAT_RUN_MAIN=1", "GORACE=atexit_sleep_ms=0")
	stdin, err1 := p.cmd.StdinPipe()
	stdout, err2 := p.cmd.StdoutPipe()
	if err := errors.Join(err1, err2, p.cmd.Start()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.cmd.Process.Kill(); p.cmd.Wait() })
	p.stdin, p.stdout = stdin, bufio.NewScanner(stdout)
	for p.stdout.Scan() {
		if _, addr, ok := strings.Cut(p.stdout.Text(), "http://"); ok {
			p.addr = addr
			return p
		}
	}
	t.Fatal("main printed no http:// address")
	return nil
}

func TestMainStopsCleanlyOnSignal(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("no SIGINT to send on Windows")
	}
	p := startMain(t, "-addr", "127.0.0.1:0")
	t.Logf("main is listening on %s", p.addr)
	resp, _, br := rawHandshake(t, p.addr, "", "")
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatal(resp.Status)
	}
	if _, hello, err := readRawFrame(br); err != nil || !strings.Contains(string(hello), `"hello"`) {
		t.Fatalf("no hello from main: %q %v", hello, err)
	}

	start := time.Now()
	p.cmd.Process.Signal(os.Interrupt)
	exited := make(chan error, 1)
	go func() { exited <- p.cmd.Wait() }()
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("main exited with %v, want status 0", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("main still running 2 s after SIGINT")
	}
	t.Logf("main exited 0, %v after SIGINT", time.Since(start).Round(time.Millisecond))
	if err := readUntilClose(br); err != nil {
		t.Fatal(err)
	}
	t.Log("the client received a close frame before the connection ended")
}

// Names given with -host, for a reverse proxy or a DNS name, are accepted as
// a WebSocket's Host; others are not.
func TestMainAcceptsNamesGivenWithHost(t *testing.T) {
	p := startMain(t, "-addr", "127.0.0.1:0", "-host", "chat.example, Proxy.LAN")
	for _, tc := range []struct {
		host string
		want int
	}{
		{"chat.example", http.StatusSwitchingProtocols},
		{"proxy.lan:8080", http.StatusSwitchingProtocols},
		{"other.example", http.StatusForbidden},
	} {
		resp, _, _ := rawHandshake(t, p.addr, tc.host, "http://"+tc.host)
		if resp.StatusCode != tc.want {
			t.Fatalf("Host %q: status %d, want %d", tc.host, resp.StatusCode, tc.want)
		}
		t.Logf("Host %q: %s", tc.host, resp.Status)
	}
}

func TestMainReportsBusyPort(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	cmd := exec.Command(os.Args[0], "-addr", taken.Addr().String())
	cmd.Env = append(os.Environ(), "WSCHAT_RUN_MAIN=1")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	err = cmd.Run()
	t.Logf("stderr: %q", stderr.String())
	if exit, ok := err.(*exec.ExitError); !ok || exit.ExitCode() != 1 {
		t.Fatalf("main exited with %v, want status 1", err)
	}
	line := strings.TrimSuffix(stderr.String(), "\n")
	if strings.Contains(line, "\n") || !strings.HasPrefix(line, "wschat: listen tcp") || strings.Contains(line, "goroutine") {
		t.Fatalf("want one clear error line, got %q", stderr.String())
	}
}

// ---- Benchmarks ----
//
//	go test -bench . -run '^$'
//	WSCHAT_BENCH_CONNS=10000 go test -bench IdleConnections -run '^$' -benchtime 1x

// quiet is a room change for benchmarks: no log lines, no flood limit.
func quiet(r *room) {
	r.logf = func(string, ...any) {}
	r.floodInterval = 0
}

// A tally counts deliveries across many client goroutines and lets one
// goroutine wait until a count is reached.
type tally struct {
	mu      sync.Mutex
	count   int
	target  int
	reached chan struct{}
}

func (t *tally) add(n int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.count += n
	if t.reached != nil && t.count >= t.target {
		close(t.reached)
		t.reached = nil
	}
}

func (t *tally) value() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.count
}

// reset starts the count again from zero.
func (t *tally) reset() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.count = 0
}

// waitFor waits until count reaches target, failing after timeout.
func (t *tally) waitFor(tb testing.TB, target int, timeout time.Duration) {
	t.mu.Lock()
	if t.count >= target {
		t.mu.Unlock()
		return
	}
	reached := make(chan struct{})
	t.target, t.reached = target, reached
	t.mu.Unlock()
	select {
	case <-reached:
	case <-time.After(timeout):
		t.mu.Lock()
		defer t.mu.Unlock()
		tb.Fatalf("gave up at %d of %d deliveries", t.count, target)
	}
}

// dialMany connects n clients to url, dialing a few at a time, and gives
// every frame each of them receives to onFrame, from one goroutine per
// client, until the test ends.
func dialMany(tb testing.TB, url string, n int, onFrame func(client int, frame []byte)) []*websocket.Conn {
	tb.Helper()
	conns := make([]*websocket.Conn, n)
	var readers sync.WaitGroup
	tb.Cleanup(func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
		readers.Wait()
	})
	origin := "http://" + strings.TrimPrefix(strings.TrimSuffix(url, "/ws"), "ws://")
	var dialers sync.WaitGroup
	errs := make(chan error, n)
	next := make(chan int, n)
	for i := range n {
		next <- i
	}
	close(next)
	for range min(n, 16) {
		dialers.Go(func() {
			for i := range next {
				conn, err := websocket.Dial(url, "", origin)
				var first []byte
				if err == nil { // once its hello is here, the client is in the room
					err = websocket.Message.Receive(conn, &first)
				}
				if err != nil {
					errs <- err
					return
				}
				conns[i] = conn
				readers.Go(func() {
					for frame := first; ; {
						onFrame(i, frame)
						if websocket.Message.Receive(conn, &frame) != nil {
							return
						}
					}
				})
			}
		})
	}
	dialers.Wait()
	close(errs)
	if err := <-errs; err != nil {
		tb.Fatalf("dialing client: %v", err)
	}
	return conns
}

var msgMarker = []byte(`{"type":"msg"`)

// BenchmarkBroadcast measures what one message costs, sent by one client and
// received by every client, server and in-process clients together. In the
// plain variant one sender waits for each message to reach everyone before it
// sends the next, so every frame carries one event. In the burst variant 10
// senders send 10 messages each at once, and the writers batch.
func BenchmarkBroadcast(b *testing.B) {
	for _, burst := range []bool{false, true} {
		for _, clients := range []int{10, 100, 1000} {
			name := fmt.Sprintf("clients=%d", clients)
			if burst {
				name = "burst/" + name
			}
			b.Run(name, func(b *testing.B) { benchBroadcast(b, clients, burst) })
		}
	}
}

func benchBroadcast(b *testing.B, clients int, burst bool) {
	senders, perSender := 1, 1
	if burst {
		senders, perSender = 10, 10
	}
	_, srv := startServer(b, quiet)
	var delivered tally
	var frames atomic.Int64
	conns := dialMany(b, wsURL(srv), clients, func(_ int, frame []byte) {
		frames.Add(1)
		delivered.add(bytes.Count(frame, msgMarker))
	})
	// One message through, so every join has been delivered before the clock starts.
	websocket.Message.Send(conns[0], "warm-up")
	delivered.waitFor(b, clients, time.Minute)
	delivered.reset()
	frames.Store(0)

	b.ReportAllocs()
	b.ResetTimer()
	for sent := 0; sent < b.N; {
		round := min(senders*perSender, b.N-sent)
		var wg sync.WaitGroup
		for s := range senders {
			wg.Go(func() {
				for i := s; i < round; i += senders { // the round's messages, dealt out in turn
					websocket.Message.Send(conns[s], "a message of a typical length for a chat")
				}
			})
		}
		wg.Wait()
		sent += round
		delivered.waitFor(b, sent*clients, time.Minute)
	}
	b.StopTimer()
	perDelivery := float64(b.Elapsed().Nanoseconds()) / float64(b.N*clients)
	b.ReportMetric(perDelivery, "ns/delivery")
	b.ReportMetric(1e9/perDelivery, "deliveries/s")
	b.ReportMetric(float64(b.N*clients)/float64(frames.Load()), "events/frame")
}

// BenchmarkSteadyLatency is a busy evening in a big room: 1000 clients, 10 of
// whom send 5 messages a second each (within the flood limit, which stays on)
// for 3 s. It reports the time from a send to the last client's receipt.
func BenchmarkSteadyLatency(b *testing.B) {
	const clients, senders, perSecond, duration = 1000, 10, 5, 3 * time.Second
	_, srv := startServer(b, func(r *room) { r.logf = func(string, ...any) {} })

	// Message i says "#i#". Clients find it with a byte search, not a JSON
	// decoder, so that the clients cost the measurement as little as possible.
	perSender := int(duration.Seconds() * perSecond)
	total := senders * perSender
	var sentAt, lastAt []atomic.Int64 // nanoseconds since base
	var receipts []atomic.Int32
	base := time.Now()
	var delivered tally
	conns := dialMany(b, wsURL(srv), clients, func(_ int, frame []byte) {
		now := int64(time.Since(base))
		n := 0
		for rest := frame; ; n++ {
			_, after, found := bytes.Cut(rest, []byte(`"msg":"#`))
			if !found {
				break
			}
			digits, tail, _ := bytes.Cut(after, []byte("#"))
			rest = tail
			i, _ := strconv.Atoi(string(digits))
			if receipts[i].Add(1) == clients {
				lastAt[i].Store(now)
			}
		}
		delivered.add(n)
	})

	sentAt, lastAt, receipts = make([]atomic.Int64, total*b.N), make([]atomic.Int64, total*b.N), make([]atomic.Int32, total*b.N)
	var latencies []time.Duration
	for round := range b.N {
		var wg sync.WaitGroup
		for s := range senders {
			wg.Go(func() {
				// Senders take turns, so the room sees one message every 20 ms.
				time.Sleep(time.Duration(s) * time.Second / perSecond / senders)
				tick := time.NewTicker(time.Second / perSecond)
				defer tick.Stop()
				for j := range perSender {
					i := round*total + j*senders + s
					sentAt[i].Store(int64(time.Since(base)))
					websocket.Message.Send(conns[s], fmt.Sprintf("#%d#", i))
					<-tick.C
				}
			})
		}
		wg.Wait()
		delivered.waitFor(b, (round+1)*total*clients, time.Minute)
		for i := round * total; i < (round+1)*total; i++ {
			latencies = append(latencies, time.Duration(lastAt[i].Load()-sentAt[i].Load()))
		}
	}
	slices.Sort(latencies)
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	b.ReportMetric(ms(latencies[len(latencies)/2]), "p50-ms")
	b.ReportMetric(ms(latencies[len(latencies)*99/100]), "p99-ms")
	b.ReportMetric(ms(latencies[len(latencies)-1]), "max-ms")
	b.ReportMetric(0, "ns/op") // one op is a 3 s scenario: its time says nothing
}

// BenchmarkIdleConnections runs the real main in a child process, connects
// N clients to it (1000, or WSCHAT_BENCH_CONNS), and reports how long it took
// until every client had heard of every join, the server's own resident
// memory per connection once the joins have settled, and how long one message
// then takes to reach all N.
func BenchmarkIdleConnections(b *testing.B) {
	n := 1000
	if s := os.Getenv("WSCHAT_BENCH_CONNS"); s != "" {
		var err error
		if n, err = strconv.Atoi(s); err != nil || n < 2 {
			b.Fatalf("WSCHAT_BENCH_CONNS=%q: want a number of connections, at least 2", s)
		}
	}
	if _, err := os.Stat("/proc/self/status"); err != nil {
		b.Skip("measuring the server's memory needs Linux's /proc")
	}
	// Go raises the soft limit on open files to the hard limit at start-up;
	// this process needs one per client, and the server one per connection.
	if limit := openFileLimit(); limit < n+100 {
		b.Skipf("%d connections need %d open files per process; the limit here is %d (raise it with ulimit -n)", n, n+100, limit)
	}
	for range b.N {
		benchIdle(b, n)
	}
}

func benchIdle(b *testing.B, n int) {
	server := startMain(b, "-addr", "127.0.0.1:0")
	pid := server.cmd.Process.Pid
	before := residentKB(b, pid)

	var joined, heard, left tally
	settled := make([]bool, n) // client i has seen "online":n; only its reader touches settled[i]
	start := time.Now()
	conns := dialMany(b, "ws://"+server.addr+"/ws", n, func(i int, frame []byte) {
		left.add(bytes.Count(frame, []byte(`"type":"leave"`)))
		heard.add(bytes.Count(frame, msgMarker))
		if !settled[i] && bytes.HasSuffix(frame, fmt.Appendf(nil, `"online":%d}`, n)) {
			settled[i] = true
			joined.add(1)
		}
	})
	dialed := time.Since(start)
	joined.waitFor(b, n, 10*time.Minute)
	joinTime := time.Since(start)
	if kicked := left.value(); kicked > 0 {
		b.Fatalf("%d clients were disconnected while joining", kicked)
	}
	settledKB := residentKB(b, pid)
	// How much of that is live, and how much garbage the join storm left for
	// the next collection? Ask the server for a full collection, and look again.
	io.WriteString(server.stdin, "collect\n")
	var heap, stacks int
	for server.stdout.Scan() {
		if _, err := fmt.Sscanf(server.stdout.Text(), "collected: heap %d stacks %d", &heap, &stacks); err == nil {
			break
		}
	}
	if heap == 0 {
		b.Fatal("no answer from the server")
	}
	liveKB := residentKB(b, pid)

	start = time.Now()
	websocket.Message.Send(conns[0], "hello, everyone")
	heard.waitFor(b, n, time.Minute)
	reachAll := time.Since(start)

	perConn := func(kb int) float64 { return float64(kb) / float64(n) }
	b.ReportMetric(perConn(settledKB-before), "server-KB/conn")
	b.ReportMetric(perConn(liveKB-before), "live-KB/conn")
	b.ReportMetric(perConn(heap/1024), "heap-KB/conn")
	b.ReportMetric(perConn(stacks/1024), "stacks-KB/conn")
	b.ReportMetric(dialed.Seconds(), "dial-s")
	b.ReportMetric(joinTime.Seconds(), "join-s")
	b.ReportMetric(float64(reachAll)/float64(time.Millisecond), "reach-all-ms")
	b.ReportMetric(0, "ns/op")
}

// residentKB reads a process's resident memory from /proc.
func residentKB(tb testing.TB, pid int) int {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		tb.Fatal(err)
	}
	for line := range strings.Lines(string(status)) {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(rest), " kB"))
			if err != nil {
				tb.Fatal(err)
			}
			return kb
		}
	}
	tb.Fatal("no VmRSS in " + string(status))
	return 0
}

// openFileLimit reads this process's limit on open files from /proc, or
// returns a large number where it cannot tell.
func openFileLimit() int {
	limits, _ := os.ReadFile("/proc/self/limits")
	for line := range strings.Lines(string(limits)) {
		if rest, ok := strings.CutPrefix(line, "Max open files"); ok {
			if soft, err := strconv.Atoi(strings.Fields(rest)[0]); err == nil {
				return soft
			}
		}
	}
	return 1 << 30
}
