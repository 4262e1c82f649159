package main

// These tests drive the real server with WebSocket clients over real TCP.
// `go test -v -run TestMessageReachesEveryone` tells the first story step by
// step; then come helpers, the other stories, and main in a child process.

import (
	"bufio"
	"bytes"
	"cmp"
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

// startServer serves a fresh room, narrating its log; change may lower limits.
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

// joinRoom connects a user per name: it gets its hello, the others its join.
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

// protocolFields is the README's protocol table: each type's fields, and
// those that may be left out (hello's history, when it is 0).
var protocolFields = map[string]struct{ all, optional []string }{
	"hello": {[]string{"type", "uid", "online", "run", "history"}, []string{"history"}},
	"join":  {[]string{"type", "uid", "online"}, nil},
	"leave": {[]string{"type", "uid", "online"}, nil},
	"msg":   {[]string{"type", "id", "uid", "msg", "at"}, nil},
}

// read returns the next event, waiting at most 5 s, and checks the format:
// one JSON object per line, with exactly its type's protocolFields.
func (tc *testClient) read() (ev event, err error) {
	line, err := tc.readLine()
	if err != nil {
		return event{}, err
	}
	bad := func(format string, args ...any) (event, error) {
		return event{}, fmt.Errorf("%s: bad line %q: %s", tc.name, line, fmt.Sprintf(format, args...))
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal([]byte(line), &fields); err != nil {
		return bad("%v", err)
	}
	if err := json.Unmarshal([]byte(line), &ev); err != nil {
		return bad("%v", err)
	}
	want, ok := protocolFields[ev.Type]
	if !ok {
		return bad("no event type %q", ev.Type)
	}
	for name := range fields {
		if !slices.Contains(want.all, name) {
			return bad("a %s event has no field %q", ev.Type, name)
		}
	}
	for _, name := range want.all {
		if _, ok := fields[name]; !ok && !slices.Contains(want.optional, name) {
			return bad("a %s event needs the field %q", ev.Type, name)
		}
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

// is reports whether ev is want; a want without id, time or run matches any.
func (ev event) is(want event) bool {
	want.ID, want.At, want.Run = cmp.Or(want.ID, ev.ID), cmp.Or(want.At, ev.At), cmp.Or(want.Run, ev.Run)
	return ev == want
}

func hello(uid, online int) event    { return event{Type: "hello", UID: uid, Online: online} }
func join(uid, online int) event     { return event{Type: "join", UID: uid, Online: online} }
func leave(uid, online int) event    { return event{Type: "leave", UID: uid, Online: online} }
func msg(uid int, text string) event { return event{Type: "msg", UID: uid, Msg: text} }

// ---- Helpers: raw WebSocket ----

// rawHandshake opens a WebSocket by hand: any Host (empty: the address) and
// Origin (x/net always sends one), more headers, and every byte of the reply.
func rawHandshake(t testing.TB, addr, host, origin string, headers ...string) (*http.Response, net.Conn, *bufio.Reader) {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	req := "GET /ws HTTP/1.1\r\nHost: " + cmp.Or(host, addr) + "\r\n" +
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
	expectFrame(t, br, websocket.TextFrame, `"hello"`)
	return conn, br
}

// expectFrame fails unless the next raw frame has this opcode and text.
func expectFrame(t testing.TB, br *bufio.Reader, opcode byte, contains string) {
	t.Helper()
	got, payload, err := readRawFrame(br)
	if err != nil || got != opcode || !strings.Contains(string(payload), contains) {
		t.Fatalf("got opcode %d %q (%v), want opcode %d with %q", got, short(string(payload)), err, opcode, contains)
	}
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

// readRawFrame reads a server frame (never masked) as opcode and payload.
func readRawFrame(br *bufio.Reader) (opcode byte, payload []byte, err error) {
	var head [2]byte
	if _, err := io.ReadFull(br, head[:]); err != nil {
		return 0, nil, err
	}
	n := uint64(head[1] & 0x7f)
	if n >= 126 {
		ext := make([]byte, 2+6*(n-126)) // 126: a 2-byte length follows; 127: an 8-byte one
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

// readUntilClose reads raw frames until a close frame; none is an error.
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

// A connCounter counts open connections, WebSockets too: net/http forgets them.
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

// logRecorder keeps the server's log lines: a test checks why a client left.
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

// stallWriter has talker send 4 KB messages, reading each back, until n events
// wait for user uid, who reads nothing: its socket buffers (capped in Accept,
// as on a slow link) are full, its writer blocked. It returns sent, waiting.
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

// The page is served at /, and nothing else but /ws. A request whose headers
// take over headerTimeout is closed: a byte at a time cannot hold a connection.
func TestPageRoutesAndHeaderTimeout(t *testing.T) {
	const timeout = 200 * time.Millisecond
	_, srv := startServer(t, func(r *room) { r.headerTimeout = timeout })
	for _, tc := range []struct {
		method, path string
		want         int
	}{
		{"GET", "/", 200},
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
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("%s %s = %d, want %d", tc.method, tc.path, resp.StatusCode, tc.want)
		}
		page := string(body) == string(indexHTML) && strings.Contains(string(body), "<title>wschat</title>")
		if tc.want == 200 && (!page || resp.Header.Get("Content-Type") != "text/html; charset=utf-8") {
			t.Fatalf("GET / did not serve the embedded page, as %q", resp.Header.Get("Content-Type"))
		}
	}
	t.Logf("GET / serves the embedded page (%d bytes)", len(indexHTML))
	start := time.Now() // before the dial: the server's timeout starts once it accepts
	conn, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	io.WriteString(conn, "GET / HTTP/1.1\r\nHost: localhost\r\n") // and never the blank line
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = conn.Read(make([]byte, 1))
	if took := time.Since(start); err != io.EOF || took < timeout {
		t.Fatalf("after %v: %v, want the connection closed after %v", took, err, timeout)
	}
	t.Logf("the server closed the connection %v after the half request", time.Since(start).Round(time.Millisecond))
}

// Another site's page may not chat in a visitor's name: an Origin must name
// the Host asked, and Host must be an IP address or one of this server's
// names: a rebound DNS name sends a matching Origin, and is refused too.
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

// hello tells a newcomer who it is and how many messages follow: the history,
// as everyone received it, no joins or leaves; then it is live. The others hear
// its join and leave. User ids are never reused; historySize messages are kept.
func TestHelloJoinLeaveAndHistory(t *testing.T) {
	_, srv := startServer(t, func(r *room) { r.floodInterval = 0 })
	users := joinRoom(t, srv, "alice", "bob", "carol") // each gets its hello; the others, its join
	alice, bob, carol := users[0], users[1], users[2]
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
		carol.expect(msg(2, text))
	}
	t.Log("bob closes his tab; dave comes")
	bob.conn.Close()
	alice.expect(leave(2, 2))
	carol.expect(leave(2, 2))
	dave := dial(t, srv, "dave") // len(clients)+1 would make him user 3 again
	dave.expect(event{Type: "hello", UID: 4, Online: 3, History: 3})
	for _, want := range heard {
		if line, err := dave.readLine(); err != nil || line != want {
			t.Fatalf("dave got %q (%v), want %q, as alice had it", line, err, want)
		}
	}
	t.Logf("dave received the 3 messages byte for byte, their times included, and no join or leave")
	alice.expect(join(4, 3))
	carol.expect(join(4, 3))
	alice.say("now live")
	alice.expect(msg(1, "now live"))
	dave.expect(msg(1, "now live"))
	t.Log("alice says 0 to 122; erin comes, and is sent the last 100 messages only")
	for i := range 123 {
		alice.say(fmt.Sprint(i))
		alice.expect(event{Type: "msg", ID: i + 5, UID: 1, Msg: fmt.Sprint(i)})
	}
	erin := dial(t, srv, "erin")
	erin.expect(event{Type: "hello", UID: 5, Online: 4, History: 100})
	for i := 23; i < 123; i++ {
		erin.expect(event{Type: "msg", ID: i + 5, UID: 1, Msg: fmt.Sprint(i)})
	}
}

// ---- Messages and bad input ----

// A message is trimmed, a blank one dropped; other text goes out as it came.
func TestTextIsRelayedVerbatim(t *testing.T) {
	_, srv := startServer(t, nil)
	users := joinRoom(t, srv, "alice", "bob")
	alice, bob := users[0], users[1]
	alice.say("  \t hi there \n ")
	alice.expect(msg(1, "hi there"))
	bob.expect(msg(1, "hi there"))
	alice.say("")
	alice.say(" \n\t ")
	t.Log("the blank ones are not relayed: bob's next event is the message after them")
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
	raw, err := bob.readLine()
	if err != nil || !strings.Contains(raw, `"msg":"<b>&</b>"`) {
		t.Fatalf("<b>&</b> arrived as %q (%v)", raw, err)
	}
	t.Logf("bob received %s", raw)
	// Invalid UTF-8 must still come out as valid JSON: the bad byte becomes U+FFFD.
	alice.say("a\xffb")
	line, err := bob.readLine()
	var ev event
	if err != nil || !json.Valid([]byte(line)) || json.Unmarshal([]byte(line), &ev) != nil || ev.Msg != "a\uFFFDb" {
		t.Fatalf("invalid UTF-8 relayed as %q (%v)", line, err)
	}
	t.Logf("bob received %s", line)
}

// A frame too large, or binary, closes only its sender's connection.
func TestBadFrameClosesOnlyItsSender(t *testing.T) {
	exactly := strings.Repeat("x", maxMessageBytes)
	for _, bad := range []any{exactly + "y", []byte{0, 1, 2}} {
		_, srv := startServer(t, nil)
		users := joinRoom(t, srv, "alice", "mallory")
		alice, mallory := users[0], users[1]
		mallory.say(exactly) // at the limit: fine
		alice.expect(msg(2, exactly))
		mallory.expect(msg(2, exactly))
		// An oversized frame's payload is not read: mallory's write may get a reset.
		t.Logf("mallory sends %s", short(fmt.Sprintf("%q", bad)))
		websocket.Message.Send(mallory.conn, bad)
		mallory.expectClosed()
		alice.expect(leave(2, 1))
		alice.say("still here")
		alice.expect(msg(1, "still here"))
	}
}

// The server speaks no subprotocol, so it names none, whatever is offered
// (RFC 6455 allows it). x/net alone would echo one offer, and refuse two.
func TestEverySubprotocolIsDeclined(t *testing.T) {
	_, srv := startServer(t, nil)
	for _, offer := range []string{"chat", "chat, superchat", " , ,,", `;="x`} {
		resp, _, br := rawHandshake(t, srv.Listener.Addr().String(), "", "", "Sec-WebSocket-Protocol: "+offer)
		if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Sec-WebSocket-Protocol") != "" {
			t.Fatalf("offered %q: %s, Sec-WebSocket-Protocol %q; want 101 and none", offer, resp.Status, resp.Header.Get("Sec-WebSocket-Protocol"))
		}
		expectFrame(t, br, websocket.TextFrame, `"hello"`)
		t.Logf("offered %q: 101, no subprotocol named, hello received", offer)
	}
}

// ---- Liveness: pings and pongs ----

// lastHeard is when the server last heard from the user with this id.
func (r *room) lastHeard(uid int) time.Time { return r.serverSide(uid).tcp.lastHeard() }

// A client that reads but answers no ping (a raw socket answers nothing) is
// pinged once, pingAfter after it was last heard, and dropped at dropAfter, not
// a second before; the others hear one leave. The clock runs by hand.
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

// Any byte from a client is hearing from it: a pong, a ping of its own (which
// gets its pong), 1000 unasked pongs (read through). None drops the client.
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

// A client that floods pings and reads no pong blocks only its own read loop,
// where x/net writes pongs; no longer heard, it is dropped, goroutines and all.
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

// pingUntilUnread pings, reading no pong, until the server stops reading (2 s).
func pingUntilUnread(t testing.TB, pinger net.Conn) {
	t.Helper()
	pinger.(*net.TCPConn).SetReadBuffer(4096) // a few pongs fill it
	pings := bytes.Repeat(clientFrame(websocket.PingFrame, strings.Repeat("p", 125)), 100)
	for i := 0; ; i++ {
		if i == 100_000 {
			t.Fatal("the server never stopped reading the pinger")
		}
		pinger.SetWriteDeadline(time.Now().Add(2 * time.Second))
		if n, err := pinger.Write(pings); err != nil && n == 0 {
			return // not a byte taken in 2 s: stuck, not just slow on a busy machine
		}
	}
}

// ---- Delivery guarantees ----

// hello's run changes at a restart: a page then knows its old ids mean others.
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
	t.Logf("bob heard %d to %d as history, then %d to %d live: every number once, in order", first, first+hello.History-1, first+hello.History, total-1)
}

// A message relayed while a newcomer waits for the room's lock reaches it
// once: join reads the history under that lock, so the message is in the
// history or queued live. The test holds the lock while alice's message,
// then bob's join, wait for it.
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

// waitUntilBlocked waits until the stacks show room.method waiting for a lock.
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
// of at most maxFrameBytes (or one larger event): clients cap a frame
// (coder/websocket at 32 KiB). A ping for it goes ahead of the waiting events
// (a busy room may have no last), taking none of their places. Here alice's
// 4 KB messages pile up for sleepy, one of 4096 control bytes (24 KB as JSON).
func TestCatchingUpComesInCappedFrames(t *testing.T) {
	r, srv := startServer(t, func(r *room) { r.floodInterval = 0 })
	alice := joinRoom(t, srv, "alice")[0]
	conn, sleepy := rawJoin(t, srv.Listener.Addr().String())
	alice.expect(join(2, 2))
	sent, _ := stallWriter(t, r, alice, 2, 40)
	big := strings.Repeat("\x01", maxMessageBytes)
	alice.say(big)
	alice.expect(msg(1, big))
	for range 10 {
		alice.say(fmt.Sprintf("%d %4000s", sent, "."))
		alice.read()
		sent++
	}
	r.checkClients(r.lastHeard(2).Add(r.pingAfter))
	t.Log("the clock asks for a ping while sleepy is behind; sleepy reads again")
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	pingAt, largest, shared := -1, 0, 0
	for next := 0; next < sent; {
		opcode, frame, err := readRawFrame(sleepy)
		if err != nil {
			t.Fatalf("sleepy, at message %d of %d: %v", next, sent, err)
		}
		if opcode == websocket.PingFrame {
			pingAt = next
			continue
		}
		lines := strings.Split(string(frame), "\n")
		if len(frame) > 16<<10 && len(lines) > 1 { // the protocol's promise, whatever main.go says
			t.Fatalf("a frame of %d bytes with %d events", len(frame), len(lines))
		}
		largest = max(largest, len(frame))
		if len(lines) > 1 {
			shared++
		}
		for _, line := range lines {
			var ev event
			if json.Unmarshal([]byte(line), &ev) != nil || ev.Msg != big && !strings.HasPrefix(ev.Msg, fmt.Sprint(next, " ")) {
				t.Fatalf("got %.60q, want alice's message %d", line, next)
			}
			if ev.Msg != big {
				next++
			}
		}
	}
	if pingAt < 0 {
		t.Fatalf("no ping before the last of the %d messages", sent)
	}
	if shared == 0 {
		t.Fatal("no frame carried more than one event")
	}
	t.Logf("the ping came before message %d of %d; sleepy caught up on all %d messages, in order; largest frame %d bytes; %d frames carried several events", pingAt, sent, sent+1, largest, shared)
}

// Events share a frame up to 16 KiB, the newlines counted, and fill it: the
// next would not fit. A larger event goes alone. Here 2000 queued events.
func TestFramesAreFilledUpTo16KiB(t *testing.T) {
	const promised = 16 << 10 // the README's, whatever main.go says
	c := &client{}
	for i := range 2000 {
		c.queue = append(c.queue, bytes.Repeat([]byte("x"), 40+i*7919%(promised/4)))
	}
	c.queue = slices.Insert(c.queue, 1000, bytes.Repeat([]byte("y"), 24<<10)) // a large event, alone
	for frames := 0; len(c.queue) > 0; frames++ {
		events := c.takeQueue()
		frame := bytes.Join(events, []byte("\n"))
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
	_, srv := startServer(t, func(r *room) { r.floodInterval = 0 })   // no flood limit
	users := joinRoom(t, srv, "1", "2", "3", "4", "5", "6", "7", "8") // as many as clients
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

// A client that never reads holds up nobody: at most queueLimit events wait for
// it; the next drops it; all hear its leave. What was queued still reaches it,
// then a close frame, within the drop's grace.
func TestSlowClientIsDisconnectedWithoutDelayingOthers(t *testing.T) {
	logs := &logRecorder{t: t}
	r, srv := startServer(t, func(r *room) { r.floodInterval, r.logf = 0, logs.logf })
	users := joinRoom(t, srv, "alice", "sleepy") // sleepy reads nothing, until the end
	alice, sleepy := users[0], users[1]
	sent, waiting := stallWriter(t, r, alice, 2, 10)
	limit := waiting + 100 // enough queued at the drop to see that all of it still arrives
	r.mu.Lock()
	r.queueLimit = limit
	r.mu.Unlock()
	t.Logf("the queue limit is now %d; alice talks on", limit)
	for seen := waiting; ; sent++ {
		if sent == 100_000 {
			t.Fatal("sleepy was never disconnected")
		}
		text := fmt.Sprintf("%d %4000s", sent, ".")
		alice.say(text)
		alice.expect(msg(1, text)) // and so it is in sleepy's queue, or sleepy is gone
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
	alice.say("still here")
	alice.expect(msg(1, "still here"))
	t.Log("sleepy reads again, within the drop's grace")
	for next := 0; next < sent; next++ { // sent is now the message that dropped sleepy
		ev, err := sleepy.read()
		if err != nil || !strings.HasPrefix(ev.Msg, fmt.Sprint(next, " ")) {
			t.Fatalf("sleepy got %.60v (%v), want alice's message %d of %d", ev, err, next, sent)
		}
	}
	sleepy.expectClosed()
	t.Logf("sleepy received all %d messages queued for it, then the close frame", sent)
	waitFor(t, "the log to say why sleepy left", func() bool { // once its connection is done
		return logs.contains(fmt.Sprintf("user 2 left: too slow: %d events waiting", limit))
	})
}

// A join that finds a queue full drops its owner; the newcomer, in the room
// by then, hears that leave. Here sleepy's queue is full when carol joins.
func TestNewcomerHearsTheLeaveItsJoinCaused(t *testing.T) {
	r, srv := startServer(t, func(r *room) { r.floodInterval = 0 })
	alice := joinRoom(t, srv, "alice", "sleepy")[0]           // sleepy never reads
	_, waiting := stallWriter(t, r, alice, 2, historySize+10) // more than carol's hello and history
	r.mu.Lock()
	r.queueLimit = waiting
	r.mu.Unlock()
	carol := dial(t, srv, "carol")
	carol.expect(event{Type: "hello", UID: 3, Online: 3, History: historySize})
	for range historySize {
		carol.read()
	}
	carol.expect(leave(2, 2))
	alice.expect(join(3, 3))
	alice.expect(leave(2, 2))
}

// A client whose queue is full is dropped after the broadcast that found it so:
// its leave lands at one place in every stream. Eight clients read nothing;
// alice, bob and carol read each message before the next, never 20 behind.
func TestTooSlowClientsLeaveAtOnePlace(t *testing.T) {
	r, srv := startServer(t, func(r *room) { r.queueLimit, r.floodInterval = 20, 0 })
	users := joinRoom(t, srv, "alice", "bob", "carol", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8")
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

// A message read from a client just dropped is not broadcast (everyone heard
// its leave), and its reader stops at once, though frames wait, each worth a
// flood interval. The server reads all of mallory's frames, relays the first,
// holds the second one flood interval; the room drops mallory meanwhile.
func TestDroppedClientSpeaksNoMore(t *testing.T) {
	r, srv := startServer(t, func(r *room) { r.floodBurst, r.floodInterval = 1, 500*time.Millisecond })
	alice := joinRoom(t, srv, "alice")[0]
	mallory, br := rawJoin(t, srv.Listener.Addr().String())
	alice.expect(join(2, 2))
	t.Log("mallory sends two messages and 100 empty frames in one TCP write")
	frames := append(clientFrame(websocket.TextFrame, "first"), clientFrame(websocket.TextFrame, "second")...)
	mallory.Write(append(frames, bytes.Repeat(clientFrame(websocket.TextFrame, ""), 100)...))
	alice.expect(msg(2, "first"))
	onServer := r.serverSide(2)
	r.mu.Lock()
	r.dropLocked(onServer, "dropped by the test")
	r.mu.Unlock()
	start := time.Now()
	alice.expect(leave(2, 1))
	if _, err := io.Copy(io.Discard, br); err != nil || time.Since(start) > 3*time.Second {
		t.Fatalf("mallory's connection closed after %v (%v): want at once, the frames left unread", time.Since(start), err)
	}
	t.Logf("the server closed mallory's connection %v after the drop", time.Since(start).Round(time.Millisecond))
	alice.say("still here")
	alice.expect(msg(1, "still here")) // and not mallory's "second"
}

// The log is written outside every lock: a blocked log (a paused terminal)
// holds up only its goroutine. Here carol's join and bob's leave block the log.
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

// A connection's goroutines end when it goes; the room's clock, at shutdown.
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

// Shutting down sends every healthy client a close frame and no leave (a
// page would show everyone leaving), is not held up by a blocked writer, and
// returns once every connection is closed. Who comes after is not let in.
func TestShutdownClosesEveryConnection(t *testing.T) {
	r, srv := startServer(t, func(r *room) { r.floodInterval = 0 })
	users := joinRoom(t, srv, "alice", "sleepy", "bob") // sleepy never reads
	_, rawBr := rawJoin(t, srv.Listener.Addr().String())
	rawClosed := make(chan error, 1)
	go func() { rawClosed <- readUntilClose(rawBr) }() // a healthy reader that sees raw frames
	users[0].expect(join(4, 4))
	var readers sync.WaitGroup
	noLeave := func(u *testClient) { // reads until the connection ends
		for ev, err := u.read(); err == nil; ev, err = u.read() {
			if ev.Type == "leave" {
				t.Errorf("%s got %+v at shutdown", u.name, ev)
			}
		}
	}
	readers.Go(func() { noLeave(users[2]) }) // two readers: one of them is dropped after another
	stallWriter(t, r, users[0], 2, 100)
	readers.Go(func() { noLeave(users[0]) })
	start := time.Now()
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
	readers.Wait()
	t.Log("the healthy clients received a close frame, and no leave; the listener still accepts")
	late := dial(t, srv, "late")
	late.expectClosed()
	if n := r.online(); n != 0 {
		t.Fatalf("%d online after shutdown", n)
	}
}

// Shutdown waits for every connection join let in: join counts it in conns
// before it lets go of the lock; later, it could be counted after shutdown
// (which sets closing under that lock) began to wait. The test plays
// serveClient: it calls join, and is done only once shutdown drops alice.
func TestShutdownWaitsForEveryJoinedConnection(t *testing.T) {
	r := &room{limits: defaultLimits, logf: t.Logf, clients: map[*client]bool{}} // no clock
	joined := make(chan *client, 1)
	srv := httptest.NewUnstartedServer(websocket.Server{Handler: func(ws *websocket.Conn) {
		c, _ := r.join(ws)
		joined <- c
		var text string
		websocket.Message.Receive(ws, &text) // until the drop's deadline fails it
	}})
	srv.Config.ConnContext, srv.Listener = rememberConn, hearingListener{srv.Listener} // as join needs
	srv.Start()
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

// A flooder is slowed to the limit, not dropped; the others talk meanwhile.
func TestFloodIsThrottledNotDropped(t *testing.T) {
	const burst, interval, total = 20, 5 * time.Millisecond, 200
	_, srv := startServer(t, func(r *room) { r.floodBurst, r.floodInterval = burst, interval })
	users := joinRoom(t, srv, "flooder", "alice")
	flooder, alice := users[0], users[1]
	t.Logf("the flooder sends %d messages at full speed; the limit is %d at once, then one per %v", total, burst, interval)
	start := time.Now()
	sent := make(chan error, 1)
	go func() {
		var err error
		for i := 0; i < total && err == nil; i++ {
			err = websocket.Message.Send(flooder.conn, fmt.Sprint(i))
		}
		sent <- err
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

// A quiet client's 20 messages at once wait not at all (one token short, or one
// taken before the first frame, would cost 2 s). But every frame counts, even
// an ignored one: 3 empty frames spend a burst of 3; the next message waits.
func TestFloodBurstIsFreeAndEveryFrameCounts(t *testing.T) {
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
	const interval = 300 * time.Millisecond
	_, srv = startServer(t, func(r *room) { r.floodBurst, r.floodInterval = 3, interval })
	bob := joinRoom(t, srv, "bob")[0] // in a room of his own
	start = time.Now()
	for range 3 {
		bob.say("")
	}
	bob.say("after three empty frames")
	bob.expect(msg(1, "after three empty frames"))
	if took := time.Since(start); took < interval {
		t.Fatalf("the message came back after %v: the empty frames cost nothing", took)
	} else {
		t.Logf("the message waited %v for the bucket to refill", took.Round(time.Millisecond))
	}
}

// ---- The real main, in a child process ----

// With WSCHAT_RUN_MAIN=1, the test binary runs the real main instead of tests.
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

// Ctrl-C (SIGINT), or SIGTERM from docker stop and systemd, sends each client
// a close frame, and main exits 0.
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

// A second Ctrl-C ends main at once, though shutting down waits up to
// closeGrace for a stuck connection: here one that reads no pong.
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

// The defaults are the ones the README's limits table gives.
func TestDefaultsAreTheDocumentedOnes(t *testing.T) {
	want := limits{queueLimit: 4096, pingAfter: 30 * time.Second, dropAfter: 60 * time.Second,
		floodBurst: 20, floodInterval: 100 * time.Millisecond, headerTimeout: 10 * time.Second}
	if defaultLimits != want {
		t.Errorf("defaultLimits = %+v, want %+v", defaultLimits, want)
	}
	if maxMessageBytes != 4096 || maxFrameBytes != 16<<10 || historySize != 100 || closeGrace != time.Second {
		t.Errorf("maxMessageBytes %d, maxFrameBytes %d, historySize %d, closeGrace %v; want 4096, 16384, 100, 1s", maxMessageBytes, maxFrameBytes, historySize, closeGrace)
	}
}

// Only names given with -host (a proxy's, a DNS name) are accepted as Host.
func TestMainAcceptsNamesGivenWithHost(t *testing.T) {
	p := startMain(t, "-addr", "127.0.0.1:0", "-host", "chat.example, Proxy.LAN")
	for host, want := range map[string]int{
		"chat.example":   http.StatusSwitchingProtocols,
		"proxy.lan:8080": http.StatusSwitchingProtocols,
		"other.example":  http.StatusForbidden,
	} {
		resp, _, _ := rawHandshake(t, p.addr, host, "http://"+host)
		if resp.StatusCode != want {
			t.Fatalf("Host %q: status %d, want %d", host, resp.StatusCode, want)
		}
		t.Logf("Host %q: %s", host, resp.Status)
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

// Every address main prints opens the page, listening on all addresses or one.
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
// `go test -bench .`: clients share the server's CPUs, so ns/delivery counts
// both ends of one event reaching one client (compare.sh: the server alone).

// BenchmarkOneMessageTo1000Clients: one message at a time, one event per frame.
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

// BenchmarkSteadyRoom: 10 of 1000 clients talk, each up to 10 messages
// ahead, so events share frames as in a busy room.
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

// benchRoom starts a room without flood control; its clients count messages.
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

// waitFor waits for n messages; false if a client's connection failed first.
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
