package main

// These tests drive the real server: an httptest.Server in front of main's
// routes, and WebSocket clients over real TCP. `go test -v -run
// TestMessageReachesEveryone` shows one broadcast, step by step. The first
// story comes first; then helpers, the other stories, and the real main in a
// child process.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
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
	srv := httptest.NewUnstartedServer(nil)
	srv.Config = r.server()
	srv.Listener = hearingListener{&connCounter{Listener: srv.Listener}} // as main's; see TestShutdownClosesEveryConnection
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
// the way: one JSON object per line, with exactly the fields that the README's
// protocol table gives its type.
func (tc *testClient) read() (event, error) {
	line, err := tc.readLine()
	if err != nil {
		return event{}, err
	}
	var ev event
	if err := checkFields(line, &ev); err != nil {
		return event{}, fmt.Errorf("%s: bad line %q: %v", tc.name, line, err)
	}
	return ev, nil
}

// protocolFields are the README's protocol table: each event type's fields,
// and which of them may be left out (hello's history, when it is 0).
var protocolFields = map[string]struct{ all, optional []string }{
	"hello": {[]string{"type", "uid", "online", "run", "history"}, []string{"history"}},
	"join":  {[]string{"type", "uid", "online"}, nil},
	"leave": {[]string{"type", "uid", "online"}, nil},
	"msg":   {[]string{"type", "id", "uid", "msg", "at"}, nil},
}

// checkFields decodes line into ev, and fails unless it has exactly the
// fields its type is given: no "id":0 in a hello, no msg without an id.
func checkFields(line string, ev *event) error {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal([]byte(line), &fields); err != nil {
		return err
	}
	if err := json.Unmarshal([]byte(line), ev); err != nil {
		return err
	}
	want, ok := protocolFields[ev.Type]
	if !ok {
		return fmt.Errorf("no event type %q", ev.Type)
	}
	for name := range fields {
		if !slices.Contains(want.all, name) {
			return fmt.Errorf("a %s event has no field %q", ev.Type, name)
		}
	}
	for _, name := range want.all {
		if _, ok := fields[name]; !ok && !slices.Contains(want.optional, name) {
			return fmt.Errorf("a %s event needs the field %q", ev.Type, name)
		}
	}
	return nil
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

// is reports whether ev is want. A want with no message id, time or run
// matches any: the stories that care name them.
func (ev event) is(want event) bool {
	if want.ID == 0 {
		ev.ID = 0
	}
	if want.At == 0 {
		ev.At = 0
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

// rawJoin joins the room through rawHandshake, and reads the hello.
func rawJoin(t testing.TB, addr string) (net.Conn, *bufio.Reader) {
	t.Helper()
	resp, conn, br := rawHandshake(t, addr, "", "")
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatal(resp.Status)
	}
	if _, hello, err := readRawFrame(br); err != nil || !strings.Contains(string(hello), `"hello"`) {
		t.Fatalf("no hello: %q %v", hello, err)
	}
	return conn, br
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
	conn.(*net.TCPConn).SetWriteBuffer(32 << 10) // see stallWriter
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

// Write records the log of a child process.
func (l *logRecorder) Write(p []byte) (int, error) {
	for _, line := range strings.Split(strings.TrimSuffix(string(p), "\n"), "\n") {
		l.logf("%s", line)
	}
	return len(p), nil
}

// has reports whether the log has this very line.
func (l *logRecorder) has(line string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Contains(l.lines, line)
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
// returns how many messages talker sent, and how many events wait. The
// server's send buffers are capped (connCounter's Accept), as on a slow
// link: a few hundred KB fill them, not several MB.
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

// Another site's page may not chat in a visitor's name: Origin, if sent,
// must name the Host the request went to, and Host must be an IP address or
// one of this server's names. A page on a name re-pointed at this server (DNS
// rebinding) sends an Origin that matches its Host: refused all the same.
func TestOtherSitesAreRefused(t *testing.T) {
	logs := &logRecorder{t: t}
	_, srv := startServer(t, func(r *room) { r.logf = logs.logf })
	addr := srv.Listener.Addr().String()
	_, port, _ := net.SplitHostPort(addr)
	hostname, _ := os.Hostname()
	hostname = strings.TrimSuffix(hostname, ".local") // tried with and without
	for _, tc := range []struct {
		host, origin string
		want         int
	}{
		{addr, "", http.StatusSwitchingProtocols}, // no Origin: a command-line client
		{addr, "http://" + addr, http.StatusSwitchingProtocols},
		{addr, "http://evil.example", http.StatusForbidden},
		{addr, "http://127.0.0.1:1", http.StatusForbidden}, // same host, other port
		{addr, "null", http.StatusForbidden},
		{"[::1]:" + port, "http://[::1]:" + port, http.StatusSwitchingProtocols},
		{"localhost:" + port, "http://localhost:" + port, http.StatusSwitchingProtocols},
		{hostname + ":" + port, "http://" + hostname + ":" + port, http.StatusSwitchingProtocols},
		{strings.ToUpper(hostname) + ".local", "http://" + strings.ToUpper(hostname) + ".local", http.StatusSwitchingProtocols},
		{"attacker.example:" + port, "http://attacker.example:" + port, http.StatusForbidden},
		{"localhost.attacker.example", "http://localhost.attacker.example", http.StatusForbidden},
	} {
		resp, _, br := rawHandshake(t, addr, tc.host, tc.origin)
		if resp.StatusCode != tc.want {
			t.Fatalf("Host %q, Origin %q: status %d, want %d", tc.host, tc.origin, resp.StatusCode, tc.want)
		}
		if _, hello, err := readRawFrame(br); tc.want == http.StatusSwitchingProtocols && (err != nil || !strings.Contains(string(hello), `"hello"`)) {
			t.Fatalf("Host %q, Origin %q: accepted, but no hello: %q %v", tc.host, tc.origin, hello, err)
		}
		t.Logf("Host %q, Origin %q: %s", tc.host, tc.origin, resp.Status)
	}
	if !logs.has(`refused a WebSocket for Host "attacker.example:` + port + `": if that is this server, run it with -host attacker.example`) {
		t.Fatal("the Host refusal was not logged with a way to allow the name (-host takes a name, not a port)")
	}
	if !logs.contains(`refused a WebSocket from Origin "http://127.0.0.1:1" for Host "` + addr + `": behind a proxy, pass Host with its port`) {
		t.Fatal("the Origin refusal was not logged with what to change")
	}
	req, _ := http.NewRequest("GET", srv.URL+"/", nil)
	req.Host = "attacker.example"
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET / with another Host: %v %v, want the page: it holds no data", resp, err)
	}
}

// ---- Presence ----

// hello tells a newcomer who it is, everyone else hears its join and, when
// it goes, its leave. User ids count up and are never reused.
func TestHelloJoinLeave(t *testing.T) {
	_, srv := startServer(t, nil)
	users := joinRoom(t, srv, "alice", "bob", "carol") // each gets its hello; the others, its join
	alice, bob, carol := users[0], users[1], users[2]
	t.Log("bob closes his tab")
	bob.conn.Close()
	alice.expect(leave(2, 2))
	carol.expect(leave(2, 2))

	dave := dial(t, srv, "dave") // len(clients)+1 would make him user 3 again
	dave.expect(hello(4, 3))
	alice.expect(join(4, 3))
	carol.expect(join(4, 3))
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

// A frame the server will not relay, too large or binary, closes only its
// sender's connection.
func TestBadFrameClosesOnlyItsSender(t *testing.T) {
	exactly := strings.Repeat("x", maxMessageBytes)
	for _, bad := range []any{exactly + "y", []byte{0, 1, 2}} {
		_, srv := startServer(t, nil)
		users := joinRoom(t, srv, "alice", "mallory")
		alice, mallory := users[0], users[1]
		mallory.say(exactly) // at the limit: fine
		alice.expect(msg(2, exactly))
		mallory.expect(msg(2, exactly))
		// The server closes without reading an oversized frame's payload, so
		// mallory's own write may already fail with a reset.
		t.Logf("mallory sends %s", short(fmt.Sprintf("%q", bad)))
		websocket.Message.Send(mallory.conn, bad)
		mallory.expectClosed()
		alice.expect(leave(2, 1))
		alice.say("still here")
		alice.expect(msg(1, "still here"))
	}
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

// ---- Liveness: pings and pongs ----

// lastHeard is when the server last heard from the user with this id.
func (r *room) lastHeard(uid int) time.Time { return r.serverSide(uid).tcp.lastHeard() }

// expectFrame reads one raw frame, and fails unless it has this opcode and
// its payload contains this text.
func expectFrame(t testing.TB, br *bufio.Reader, opcode byte, contains string) {
	t.Helper()
	got, payload, err := readRawFrame(br)
	if err != nil || got != opcode || !strings.Contains(string(payload), contains) {
		t.Fatalf("got opcode %d %q (%v), want opcode %d with %q", got, short(string(payload)), err, opcode, contains)
	}
}

// A client that reads but answers no ping (a raw socket answers nothing by
// itself) is pinged once pingAfter after it was last heard, not again at
// every tick of the clock, and dropped at dropAfter, not a second before;
// everyone else hears its leave once. The test runs the room's clock by
// hand, at made-up times.
func TestUnansweredPingsDropAClientAfterAMinute(t *testing.T) {
	logs := &logRecorder{t: t}
	r, srv := startServer(t, func(r *room) { r.logf = logs.logf })
	users := joinRoom(t, srv, "alice", "bob")
	alice, bob := users[0], users[1]
	_, mute := rawJoin(t, srv.Listener.Addr().String())
	alice.expect(join(3, 3))
	bob.expect(join(3, 3))
	heard := r.lastHeard(3)
	clockAt := func(seconds int) { r.checkClients(heard.Add(time.Duration(seconds) * time.Second)) }
	say := func(uid int, text string) { // and everyone hears it next
		t.Helper()
		users[uid-1].say(text)
		alice.expect(msg(uid, text))
		bob.expect(msg(uid, text))
		expectFrame(t, mute, websocket.TextFrame, text)
	}
	say(1, "hi") // alice and bob, heard after the mute client, stay
	say(2, "hello")
	clockAt(29)
	say(1, "29 s: no ping yet")
	clockAt(30)
	expectFrame(t, mute, websocket.PingFrame, "")
	t.Log("30 s after the mute client was last heard: a ping, which it does not answer")
	for s := 31; s < 60; s++ {
		clockAt(s)
	}
	say(1, "31 to 59 s: no other ping, and still in the room")
	clockAt(60)
	alice.expect(leave(3, 2))
	bob.expect(leave(3, 2))
	if err := readUntilClose(mute); err != nil {
		t.Fatal(err)
	}
	t.Log("60 s: dropped, with a close frame")
	waitFor(t, "the log to say why", func() bool { return logs.contains("user 3 left: heard nothing for 60 s") })
	alice.say("one leave only") // the ends of the read loop and of the writer sent no other
	alice.expect(msg(1, "one leave only"))
	bob.expect(msg(1, "one leave only"))
}

// Any byte from a client is hearing from it: here a client whose only frames
// are a pong to the server's ping, then a ping of its own (which gets its
// pong), then a flood of pongs nobody asked for. None of it drops the
// client, and the flood costs nothing else: the room reads through it.
func TestPongsAndPingsCountAsHeard(t *testing.T) {
	r, srv := startServer(t, nil)
	conn, br := rawJoin(t, srv.Listener.Addr().String())
	stillThereAfter := func(heard time.Time, what string) {
		t.Helper()
		waitFor(t, what+" to be heard", func() bool { return r.lastHeard(1).After(heard) })
		r.checkClients(heard.Add(r.dropAfter))
		if r.online() != 1 {
			t.Fatalf("dropped, though it sent %s", what)
		}
		t.Logf("%s was heard: a minute after the time before it, the client is still in the room", what)
	}
	heard := r.lastHeard(1)
	r.checkClients(heard.Add(r.pingAfter))
	expectFrame(t, br, websocket.PingFrame, "")
	conn.Write(clientFrame(websocket.PongFrame, ""))
	stillThereAfter(heard, "a pong")
	expectFrame(t, br, websocket.PingFrame, "") // quiet for 30 s again, at that made-up time

	heard = r.lastHeard(1)
	conn.Write(clientFrame(websocket.PingFrame, "are you there?"))
	expectFrame(t, br, websocket.PongFrame, "are you there?")
	stillThereAfter(heard, "a ping")

	heard = r.lastHeard(1)
	pongs := bytes.Repeat(clientFrame(websocket.PongFrame, "unasked"), 1000)
	conn.Write(append(pongs, clientFrame(websocket.TextFrame, "after 1000 pongs")...))
	expectFrame(t, br, websocket.TextFrame, "after 1000 pongs")
	stillThereAfter(heard, "1000 pongs")
}

// A client that only reads, and is behind in a busy room, is pinged too: the
// ping goes ahead of the events that wait for it, not after the last (in a
// busy room there may never be a last), and takes none of their places.
// Here the lurker reads nothing while alice talks, until at least 20 of her
// messages wait for it; then the clock asks for a ping, and the lurker reads.
func TestLurkerInABusyRoomIsPinged(t *testing.T) {
	r, srv := startServer(t, func(r *room) { r.floodInterval = 0 })
	alice := joinRoom(t, srv, "alice")[0]
	conn, lurker := rawJoin(t, srv.Listener.Addr().String())
	alice.expect(join(2, 2))
	sent, waiting := stallWriter(t, r, alice, 2, 20)
	r.checkClients(r.lastHeard(2).Add(r.pingAfter))
	t.Logf("the clock asks for a ping while %d messages wait; the lurker reads", waiting)
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	pingAt := -1
	for next := 0; next < sent; {
		opcode, payload, err := readRawFrame(lurker)
		if err != nil {
			t.Fatalf("at message %d of %d: %v", next, sent, err)
		}
		if opcode == websocket.PingFrame {
			pingAt = next
			continue
		}
		for _, line := range strings.Split(string(payload), "\n") {
			var ev event
			if json.Unmarshal([]byte(line), &ev) != nil || !strings.HasPrefix(ev.Msg, fmt.Sprint(next, " ")) {
				t.Fatalf("got %.60q, want alice's message %d", line, next)
			}
			next++
		}
	}
	if pingAt < 0 {
		t.Fatalf("no ping before the last of the %d messages", sent)
	}
	t.Logf("the ping came before message %d of %d, and every message came, in order", pingAt, sent)
}

// A client that floods pings and reads nothing piles up pongs, which x/net
// writes from the server's read loop, so that loop blocks and stops reading
// the pinger. Nobody else notices; the pinger, no longer heard, goes by the
// same rule, and its goroutines end.
func TestPingingWithoutReadingIsHarmless(t *testing.T) {
	logs := &logRecorder{t: t}
	r, srv := startServer(t, func(r *room) { r.logf = logs.logf })
	alice := joinRoom(t, srv, "alice")[0]
	pinger, _ := rawJoin(t, srv.Listener.Addr().String())
	alice.expect(join(2, 2))
	pingUntilUnread(t, pinger)
	t.Log("for 2 s the server has read nothing of the pinger's; alice chats")
	alice.say("not held up")
	alice.expect(msg(1, "not held up"))
	r.checkClients(r.lastHeard(1).Add(r.dropAfter - time.Second)) // over a minute since the pinger was heard
	alice.expect(leave(2, 1))
	waitFor(t, "the pinger's read loop to end", func() bool { return logs.contains("user 2 left: heard nothing for 60 s") })
	alice.say("still here")
	alice.expect(msg(1, "still here"))
}

// pingUntilUnread sends pings, 125 bytes each, and reads none of the pongs,
// until for 2 s the server has read nothing more: it is stuck writing a pong.
func pingUntilUnread(t testing.TB, pinger net.Conn) {
	t.Helper()
	pinger.(*net.TCPConn).SetReadBuffer(4096) // a few pongs fill it
	pings := bytes.Repeat(clientFrame(websocket.PingFrame, strings.Repeat("p", 125)), 100)
	for i := 0; ; i++ {
		if i == 100_000 {
			t.Fatal("the server never stopped reading the pinger")
		}
		pinger.SetWriteDeadline(time.Now().Add(2 * time.Second))
		if _, err := pinger.Write(pings); err != nil {
			return
		}
	}
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
		before := time.Now().UnixMilli()
		bob.say(text)
		line, err := alice.readLine()
		prefix := fmt.Sprintf(`{"type":"msg","id":%d,"uid":2,"msg":%q,"at":`, i+1, text)
		at, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimPrefix(line, prefix), "}"), 10, 64)
		if err != nil || !strings.HasPrefix(line, prefix) || at < before || at > time.Now().UnixMilli() {
			t.Fatalf("alice got %q (%v), want message %d with the time it was relayed (from %d)", line, err, i+1, before)
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
	t.Logf("carol received the 3 messages byte for byte, their times included, and no join or leave")
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
	go func() {
		for i := range total {
			websocket.Message.Send(alice.conn, fmt.Sprint(i)) // a failure shows as a number missing
		}
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
	t.Logf("bob heard %d to %d as history, then %d to %d live: every number once, in order",
		first, first+hello.History-1, first+hello.History, total-1)
}

// A message relayed while a newcomer waits for the room's lock reaches it
// once: join reads the history under that lock, so the message is either in
// the history or queued live. Here the test holds the lock; alice's message
// is read, and waits for the lock; then bob's join waits behind it.
func TestMessageRelayedDuringAJoinIsNotMissed(t *testing.T) {
	r, srv := startServer(t, nil)
	alice := joinRoom(t, srv, "alice")[0]
	r.mu.Lock()
	locked := true
	t.Cleanup(func() { // before the server's cleanup, which needs the lock
		if locked {
			r.mu.Unlock()
		}
	})
	alice.say("said while bob joins")
	waitUntilBlocked(t, "broadcastMessage")
	dialed := make(chan *websocket.Conn, 1)
	go func() {
		conn, err := websocket.Dial(wsURL(srv), "", srv.URL)
		if err != nil {
			t.Error(err)
		}
		dialed <- conn
	}()
	waitUntilBlocked(t, "join")
	locked = false
	r.mu.Unlock()
	conn := <-dialed
	if conn == nil {
		t.FailNow()
	}
	bob := &testClient{t: t, name: "bob", conn: conn}
	t.Cleanup(func() { conn.Close() })
	bob.expect(event{Type: "hello", UID: 2, Online: 2, History: 1})
	bob.expect(msg(1, "said while bob joins"))
	alice.expect(msg(1, "said while bob joins"))
	alice.expect(join(2, 2))
}

// waitUntilBlocked waits until a goroutine is blocked on a lock inside this
// method of room, as the stacks of all goroutines show it.
func waitUntilBlocked(t testing.TB, method string) {
	t.Helper()
	waitFor(t, method+" to wait for the lock", func() bool {
		stacks := make([]byte, 1<<20)
		stacks = stacks[:runtime.Stack(stacks, true)]
		for _, g := range strings.Split(string(stacks), "\n\n") {
			if strings.Contains(g, "[sync.Mutex.Lock") && strings.Contains(g, ".(*room)."+method+"(") {
				return true
			}
		}
		return false
	})
	t.Logf("%s waits for the room's lock", method)
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
		if len(frame) > 16<<10 && len(lines) > 1 { // the protocol's promise, whatever main.go says
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

// Events share a frame up to 16 KiB, the newlines between them counted; a
// larger event goes alone. And a frame holds as many events as fit: the next
// one would have taken it over. Here 2000 queued events of many sizes.
func TestFramesAreFilledUpTo16KiB(t *testing.T) {
	const promised = 16 << 10 // the README's, whatever main.go says
	c := &client{}
	for i := range 2000 {
		c.queue = append(c.queue, strings.Repeat("x", 40+i*7919%(promised/4)))
	}
	c.queue = slices.Insert(c.queue, 1000, strings.Repeat("y", 24<<10)) // a large event, alone
	for frames := 0; len(c.queue) > 0; frames++ {
		events := c.takeQueue()
		frame := strings.Join(events, "\n")
		if len(events) > 1 && len(frame) > promised {
			t.Fatalf("frame %d: %d events in %d bytes", frames, len(events), len(frame))
		}
		if len(c.queue) > 0 && len(frame)+1+len(c.queue[0]) <= promised {
			t.Fatalf("frame %d: %d bytes, and the next event (%d bytes) would have fit", frames, len(frame), len(c.queue[0]))
		}
	}
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
	for i, u := range users {
		wg.Go(func() {
			for j := range perClient {
				websocket.Message.Send(u.conn, fmt.Sprint(j)) // a failure shows as a message missing
			}
		})
		wg.Go(func() {
			for range clients * perClient {
				ev, err := u.read()
				if err != nil {
					t.Error(err)
					return
				}
				received[i] = append(received[i], ev)
			}
		})
	}
	wg.Wait()
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

// A client that never reads must not hold up anyone else. At most queueLimit
// events ever wait for it; the next one disconnects it, and everyone hears
// its leave: it is never silently skipped. Here sleepy's socket is full and
// its writer blocked; then the limit is set a few events above what waits.
func TestSlowClientIsDisconnectedWithoutDelayingOthers(t *testing.T) {
	logs := &logRecorder{t: t}
	r, srv := startServer(t, func(r *room) { r.floodInterval, r.logf = 0, logs.logf })
	alice := joinRoom(t, srv, "alice", "sleepy")[0] // sleepy never reads
	_, waiting := stallWriter(t, r, alice, 2, 10)
	r.mu.Lock()
	r.queueLimit = waiting + 5
	limit := r.queueLimit
	r.mu.Unlock()
	t.Logf("the queue limit is now %d; alice talks on", limit)
	for n, seen := 0, waiting; ; n++ {
		if n == 100_000 {
			t.Fatal("sleepy was never disconnected")
		}
		alice.say(fmt.Sprint(n))
		alice.expect(msg(1, fmt.Sprint(n))) // and so it is in sleepy's queue, or sleepy is gone
		if r.serverSide(2) == nil {
			if seen != limit {
				t.Fatalf("dropped after %d events waited, want %d", seen, limit)
			}
			alice.expect(leave(2, 1))
			t.Logf("%d events waited; the next one dropped sleepy", seen)
			break
		}
		if seen = r.queued(2); seen > limit {
			t.Fatalf("%d events wait for sleepy, over the limit of %d", seen, limit)
		}
	}
	waitFor(t, "the log to say why sleepy left", func() bool {
		return logs.contains(fmt.Sprintf("user 2 left: too slow: %d events waiting", limit))
	})
	alice.say("still here")
	alice.expect(msg(1, "still here"))
}

// A join is a broadcast too, and may find a queue full. The newcomer is in
// the room by then: it hears that leave, and every count stays right. Here
// sleepy's queue is exactly full when carol joins.
func TestNewcomerHearsTheLeaveItsJoinCaused(t *testing.T) {
	r, srv := startServer(t, func(r *room) { r.floodInterval = 0 })
	alice := joinRoom(t, srv, "alice", "sleepy")[0] // sleepy never reads
	stallWriter(t, r, alice, 2, historySize+10)     // more than carol's hello and history
	r.mu.Lock()
	for c := range r.clients {
		if c.uid == 2 {
			c.mu.Lock()
			r.queueLimit = len(c.queue)
			c.mu.Unlock()
		}
	}
	r.mu.Unlock()
	carol := dial(t, srv, "carol")
	hi, err := carol.read()
	if err != nil || !hi.is(event{Type: "hello", UID: 3, Online: 3, History: hi.History}) {
		t.Fatalf("carol: %+v %v", hi, err)
	}
	for range hi.History {
		carol.read()
	}
	carol.expect(leave(2, 2))
	alice.expect(join(3, 3))
	alice.expect(leave(2, 2))
}

// A client whose queue is full is dropped after the broadcast that found it
// so, and its leave lands at the same place in every stream: dropped
// mid-loop, some would hear it before that message and others after. Here
// eight clients read nothing and are dropped so, while three read
// everything. Each of alice's messages reaches all three before she sends
// the next, so a busy machine that pauses a reader never puts it 20 events
// behind: only the eight are too slow.
func TestTooSlowClientsLeaveAtOnePlace(t *testing.T) {
	r, srv := startServer(t, func(r *room) { r.queueLimit, r.floodInterval = 20, 0 })
	names := []string{"alice", "bob", "carol", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8"}
	users := joinRoom(t, srv, names...)
	heard := make([][]event, 3)
	listen := func(i int, until event) {
		for len(heard[i]) == 0 || !heard[i][len(heard[i])-1].is(until) {
			ev, err := users[i].read()
			if err != nil {
				t.Fatal(err)
			}
			heard[i] = append(heard[i], ev)
		}
	}
	t.Log("alice sends 4 KB messages until the eight who read nothing are gone")
	for i := 0; r.online() > 3; i++ {
		if i == 100_000 {
			t.Fatal("the clients who read nothing were never dropped")
		}
		text := fmt.Sprintf("%d %4000s", i, ".")
		users[0].say(text)
		for j := range heard {
			listen(j, msg(1, text))
		}
	}
	users[0].say("done")
	for j := range heard {
		listen(j, msg(1, "done"))
	}
	if !slices.Equal(heard[0], heard[1]) || !slices.Equal(heard[0], heard[2]) {
		t.Fatal("alice, bob and carol heard the leaves at different places")
	}
	t.Logf("alice, bob and carol heard the same %d events, the eight leaves included", len(heard[0]))
}

// A message read from a client that the room has just dropped is not
// broadcast: everyone has heard its leave already. The server reads both of
// mallory's frames into its buffer at once, relays the first, and holds the
// second for one flood interval; the room drops mallory meanwhile.
func TestDroppedClientSpeaksNoMore(t *testing.T) {
	r, srv := startServer(t, func(r *room) { r.floodBurst, r.floodInterval = 1, 500*time.Millisecond })
	alice := joinRoom(t, srv, "alice")[0]
	mallory, br := rawJoin(t, srv.Listener.Addr().String())
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

// Every goroutine a connection starts ends when it goes, and the room's
// clock at shutdown.
func TestNoGoroutineIsLeftBehind(t *testing.T) {
	before := runtime.NumGoroutine()
	r, srv := startServer(t, nil)
	users := joinRoom(t, srv, "1", "2", "3", "4", "5")
	users[0].say("bye")
	for _, u := range users {
		u.expect(msg(1, "bye"))
		u.conn.Close()
	}
	waitFor(t, "the room to be empty", func() bool { return r.online() == 0 })
	srv.Close()
	r.shutdown()
	waitFor(t, "every goroutine to end", func() bool { return runtime.NumGoroutine() <= before })
	t.Logf("goroutines: %d before the server started, %d after everyone left", before, runtime.NumGoroutine())
}

// ---- Shutting down ----

// Shutting down sends every healthy client a close frame, is not held up by a
// client whose writer is blocked on a full socket, and returns only once
// every connection is closed.
func TestShutdownClosesEveryConnection(t *testing.T) {
	r, srv := startServer(t, func(r *room) { r.floodInterval = 0 })
	users := joinRoom(t, srv, "alice", "sleepy") // sleepy never reads
	_, rawBr := rawJoin(t, srv.Listener.Addr().String())
	rawClosed := make(chan error, 1)
	go func() { rawClosed <- readUntilClose(rawBr) }() // a healthy reader that sees raw frames
	users[0].expect(join(3, 3))
	stallWriter(t, r, users[0], 2, 100)
	start := time.Now()
	srv.Close()
	r.shutdown()
	took := time.Since(start)
	if open := srv.Listener.(hearingListener).Listener.(*connCounter).open.Load(); open != 0 {
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

// Events queued for a client when it is dropped reach it before its close
// frame. Here sleepy stops reading until its socket is full and at least 100
// of alice's messages wait for it; the clock drops it (no pong for a
// minute); alice talks on; then sleepy reads again, within the drop's grace,
// and receives every message it was owed, then the close frame.
func TestDroppedClientReceivesWhatWasQueued(t *testing.T) {
	r, srv := startServer(t, func(r *room) { r.floodInterval = 0 })
	users := joinRoom(t, srv, "alice", "sleepy")
	alice, sleepy := users[0], users[1]
	owed, waiting := stallWriter(t, r, alice, 2, 100)
	r.checkClients(r.lastHeard(2).Add(r.dropAfter))
	alice.expect(leave(2, 1))
	t.Logf("sleepy is dropped with %d messages waiting; alice talks on", waiting)
	for i := range 10 {
		alice.say(fmt.Sprint("after ", i))
		alice.expect(msg(1, fmt.Sprint("after ", i)))
	}
	for next := 0; next < owed; next++ {
		ev, err := sleepy.read()
		if err != nil || !strings.HasPrefix(ev.Msg, fmt.Sprint(next, " ")) {
			t.Fatalf("sleepy got %.60v (%v), want alice's message %d of %d", ev, err, next, owed)
		}
	}
	sleepy.expectClosed()
	t.Logf("sleepy received all %d messages, then the close frame", owed)
}

// Shutting down sends nobody a leave: everyone is going, and a page would
// show the others leaving one by one.
func TestShutdownSendsNoLeave(t *testing.T) {
	r, srv := startServer(t, nil)
	users := joinRoom(t, srv, "1", "2", "3", "4", "5", "6", "7", "8")
	var readers sync.WaitGroup
	for _, u := range users {
		readers.Go(func() {
			for ev, err := u.read(); err == nil; ev, err = u.read() {
				if ev.Type == "leave" {
					t.Errorf("user %s got %+v at shutdown", u.name, ev)
				}
			}
		})
	}
	r.shutdown()
	readers.Wait()
}

// A connection that arrives while the server shuts down is closed, not let in.
func TestNoJoiningWhileShuttingDown(t *testing.T) {
	r, srv := startServer(t, nil)
	r.shutdown() // an empty room: it returns at once, and the listener still accepts
	late := dial(t, srv, "late")
	late.expectClosed()
	if n := r.online(); n != 0 {
		t.Fatalf("%d online after shutdown", n)
	}
}

// Shutdown waits for every connection join let in. join counts it in conns
// before it lets go of the lock: counted later, it could be counted after
// shutdown (which sets closing under that lock) began to wait, too late.
// Here the test plays serveClient: it calls join, and says the connection is
// done only once shutdown has dropped the client.
func TestShutdownWaitsForEveryJoinedConnection(t *testing.T) {
	r := &room{limits: defaultLimits, logf: t.Logf, clients: map[*client]bool{}} // no clock
	joined := make(chan *client, 1)
	srv := httptest.NewServer(websocket.Server{Handler: func(ws *websocket.Conn) {
		c, _ := r.join(ws)
		joined <- c
		var text string
		websocket.Message.Receive(ws, &text) // until the drop's deadline fails it
	}})
	defer srv.Close()
	dial(t, srv, "alice")
	c := <-joined
	shutDown := make(chan struct{})
	go func() { r.shutdown(); close(shutDown) }()
	waitFor(t, "shutdown to drop alice", func() bool { r.mu.Lock(); defer r.mu.Unlock(); return r.closing && !r.clients[c] })
	select {
	case <-shutDown:
		t.Fatal("shutdown returned while alice's connection was not done")
	default:
	}
	func() {
		defer func() {
			if p := recover(); p != nil {
				t.Fatalf("join let alice in without counting her connection: %v", p)
			}
		}()
		r.conns.Done()
	}()
	<-shutDown
	t.Log("shutdown returned once alice's connection was done")
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
	flooder.say("done") // still connected, and hears everything
	for ev, err := flooder.read(); !ev.is(msg(1, "done")); ev, err = flooder.read() {
		if err != nil {
			t.Fatalf("the flooder lost its connection: %v", err)
		}
	}
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

// A quiet client may send its 20 messages at once: none of them waits, not
// even the 20th. At one per 2 s after the burst, one token short would make
// the burst take 2 s; a token taken before the first frame came, too.
func TestQuietClientMaySendABurst(t *testing.T) {
	_, srv := startServer(t, func(r *room) { r.floodInterval = 2 * time.Second })
	alice := joinRoom(t, srv, "alice")[0]
	start := time.Now()
	for i := range 20 {
		alice.say(fmt.Sprint(i))
	}
	for i := range 20 {
		alice.expect(msg(1, fmt.Sprint(i)))
	}
	if took := time.Since(start); took > 1500*time.Millisecond {
		t.Fatalf("the burst took %v", took)
	}
}

// ---- The real main, in a child process ----

// TestMain lets a test run the real main in a child process: the test binary
// re-executes itself with WSCHAT_RUN_MAIN=1 and the flags main should see.
func TestMain(m *testing.M) {
	if os.Getenv("WSCHAT_RUN_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// A mainProcess is the real main, running in a child process.
type mainProcess struct {
	cmd  *exec.Cmd
	addr string       // the first address it printed
	logs *logRecorder // its log
}

func startMain(t testing.TB, args ...string) *mainProcess {
	t.Helper()
	p := &mainProcess{cmd: exec.Command(os.Args[0], args...), logs: &logRecorder{t: t}}
	// The race detector sleeps 1 s before a process exits; that is not main's time.
	p.cmd.Env = append(os.Environ(), "WSCHAT_RUN_MAIN=1", "GORACE=atexit_sleep_ms=0")
	p.cmd.Stderr = p.logs
	stdout, err := p.cmd.StdoutPipe()
	if err == nil {
		err = p.cmd.Start()
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.cmd.Process.Kill(); p.cmd.Wait() })
	for lines := bufio.NewScanner(stdout); lines.Scan(); {
		if _, addr, ok := strings.Cut(lines.Text(), "http://"); ok {
			p.addr = addr
			return p
		}
	}
	t.Fatal("main printed no http:// address")
	return nil
}

// Ctrl-C (SIGINT), or SIGTERM as docker stop and systemd send, sends each
// client a close frame, and main exits with status 0.
func TestMainStopsCleanlyOnSignal(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("no SIGINT to send on Windows")
	}
	for _, sig := range []os.Signal{os.Interrupt, syscall.SIGTERM} {
		p := startMain(t, "-addr", "127.0.0.1:0")
		t.Logf("main is listening on %s", p.addr)
		_, br := rawJoin(t, p.addr)
		start := time.Now()
		p.cmd.Process.Signal(sig)
		exited := make(chan error, 1)
		go func() { exited <- p.cmd.Wait() }()
		select {
		case err := <-exited:
			if err != nil {
				t.Fatalf("main exited with %v after %v, want status 0", err, sig)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("main still running 5 s after %v", sig)
		}
		t.Logf("main exited 0, %v after %v", time.Since(start).Round(time.Millisecond), sig)
		if err := readUntilClose(br); err != nil {
			t.Fatal(err)
		}
		t.Log("the client received a close frame before the connection ended")
	}
}

// A second Ctrl-C while shutting down ends the process at once. Shutting
// down waits up to closeGrace for a connection whose writes are stuck: here
// a client that sends pings and reads none of the pongs.
func TestMainStopsAtOnceOnASecondSignal(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("no SIGINT to send on Windows")
	}
	p := startMain(t, "-addr", "127.0.0.1:0")
	pinger, _ := rawJoin(t, p.addr)
	pingUntilUnread(t, pinger)
	t.Log("main's write of a pong to the pinger is stuck; Ctrl-C")
	p.cmd.Process.Signal(os.Interrupt)
	waitFor(t, "main to shut down", func() bool { return p.logs.contains("shutting down") })
	start := time.Now()
	p.cmd.Process.Signal(os.Interrupt)
	err := p.cmd.Wait()
	if exit, ok := err.(*exec.ExitError); !ok || exit.ExitCode() != -1 {
		t.Fatalf("main ended with %v, want it killed by the second SIGINT", err)
	}
	t.Logf("the second Ctrl-C killed main after %v", time.Since(start).Round(time.Millisecond))
}

// A request whose headers are not all in within headerTimeout is closed: a
// client that sends them a byte at a time cannot hold a connection forever.
func TestSlowHeadersAreCutOff(t *testing.T) {
	const timeout = 200 * time.Millisecond
	_, srv := startServer(t, func(r *room) { r.headerTimeout = timeout })
	conn, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	start := time.Now()
	io.WriteString(conn, "GET / HTTP/1.1\r\nHost: localhost\r\n") // and never the blank line
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = conn.Read(make([]byte, 1))
	if took := time.Since(start); err != io.EOF || took < timeout {
		t.Fatalf("after %v: %v, want the connection closed after %v", took, err, timeout)
	}
	t.Logf("the server closed the connection %v after the half request", time.Since(start).Round(time.Millisecond))
}

// The defaults are the ones the README's limits table gives.
func TestDefaultsAreTheDocumentedOnes(t *testing.T) {
	want := limits{queueLimit: 4096, pingAfter: 30 * time.Second, dropAfter: 60 * time.Second,
		floodBurst: 20, floodInterval: 100 * time.Millisecond, headerTimeout: 10 * time.Second}
	if defaultLimits != want {
		t.Errorf("defaultLimits = %+v, want %+v", defaultLimits, want)
	}
	if maxMessageBytes != 4096 || maxFrameBytes != 16<<10 || historySize != 100 || closeGrace != time.Second {
		t.Errorf("maxMessageBytes %d, maxFrameBytes %d, historySize %d, closeGrace %v; want 4096, 16384, 100, 1s",
			maxMessageBytes, maxFrameBytes, historySize, closeGrace)
	}
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

// Listening on one address, main prints that address, and no other.
func TestOneAddressIsPrintedAlone(t *testing.T) {
	for _, addr := range []string{"192.168.1.20:8080", "127.0.0.1:9000", "[fe80::1]:8080"} {
		tcpAddr, err := net.ResolveTCPAddr("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		var printed strings.Builder
		printURLs(&printed, tcpAddr)
		want := "wschat is running. Open it in a browser:\n  http://" + addr + "\n"
		if printed.String() != want {
			t.Fatalf("listening on %s, printed %q, want %q", addr, printed.String(), want)
		}
	}
}

// Every address main prints opens the page: localhost and each LAN address
// when listening on all of them, or just the one.
func TestPrintedURLsOpenThePage(t *testing.T) {
	r, _ := startServer(t, nil)
	for _, addr := range []string{":0", "127.0.0.1:0"} {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		srv := r.server()
		go srv.Serve(ln)
		defer srv.Close()
		var printed strings.Builder
		printURLs(&printed, ln.Addr().(*net.TCPAddr))
		urls := strings.Fields(strings.TrimPrefix(printed.String(), "wschat is running. Open it in a browser:"))
		for _, u := range urls {
			resp, err := http.Get(u)
			if err != nil || resp.StatusCode != http.StatusOK {
				t.Fatalf("listening on %s, printed %q: %v %v", addr, u, resp, err)
			}
			resp.Body.Close()
		}
		t.Logf("listening on %s, printed %q: each serves the page", addr, urls)
	}
}

// ---- Benchmarks: what a broadcast costs ----
//
// `go test -bench .` runs these. Server and clients share this process and
// its CPUs, so ns/delivery is the cost of one event reaching one client,
// both ends counted; compare.sh measures the server alone (README).

// BenchmarkOneMessageTo1000Clients: one message at a time, sent once the
// last one has reached all 1000 clients, so each frame carries one event.
func BenchmarkOneMessageTo1000Clients(b *testing.B) {
	const clients = 1000
	conns, got := benchRoom(b, clients)
	n := 0
	for b.Loop() {
		n++
		websocket.Message.Send(conns[0], "hi")
		if !got.waitFor(n * clients) {
			b.Fatal("a client was disconnected")
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(n*clients), "ns/delivery")
}

// BenchmarkSteadyRoom: 10 of 1000 clients talk at once, each with up to 10
// messages on their way, so events share frames as in a busy room.
func BenchmarkSteadyRoom(b *testing.B) {
	const clients, senders, window = 1000, 10, 10
	conns, got := benchRoom(b, clients)
	n := 0
	for b.Loop() {
		n++
		websocket.Message.Send(conns[n%senders], "hi")
		if n > senders*window && !got.waitFor((n-senders*window)*clients) {
			b.Fatal("a client was disconnected")
		}
	}
	if !got.waitFor(n * clients) {
		b.Fatal("a client was disconnected")
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(n*clients), "ns/delivery")
}

// benchRoom starts a room without flood control, with this many clients
// that read every event and count the messages in got.
func benchRoom(b *testing.B, clients int) ([]*websocket.Conn, *deliveries) {
	_, srv := startServer(b, func(r *room) { r.floodInterval, r.logf = 0, func(string, ...any) {} })
	got := &deliveries{arrived: make(chan struct{}, 1)}
	var conns []*websocket.Conn
	for i := range clients {
		conn := dial(b, srv, fmt.Sprint("client ", i)).conn
		conns = append(conns, conn)
		go func() {
			var frame string
			for {
				if err := websocket.Message.Receive(conn, &frame); err != nil {
					got.add(-1 << 40) // waitFor gives up
					return
				}
				got.add(strings.Count(frame, `"type":"msg"`))
			}
		}()
	}
	return conns, got
}

// deliveries counts the messages the clients have received.
type deliveries struct {
	n, want atomic.Int64
	arrived chan struct{} // a signal that n reached want, or failed
}

func (d *deliveries) add(k int) {
	if n := d.n.Add(int64(k)); n >= d.want.Load() || n < 0 {
		select {
		case d.arrived <- struct{}{}:
		default:
		}
	}
}

// waitFor waits until n messages have arrived, and reports false if a
// client's connection failed first.
func (d *deliveries) waitFor(n int) bool {
	d.want.Store(int64(n))
	for {
		switch got := d.n.Load(); {
		case got < 0:
			return false
		case got >= int64(n):
			return true
		}
		<-d.arrived
	}
}
