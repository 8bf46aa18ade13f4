package kubeletstreams

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/util/httpstream"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/transport/spdy"
)

// pki is a CA, a serving certificate for 127.0.0.1 and a client certificate (the API server's), all signed by it.
type pki struct {
	dir                              string
	caFile, certFile, keyFile        string
	clientCertFile, clientKeyFile    string
	caPEM, clientCertPEM, clientKeyP []byte
}

func newPKI(t *testing.T) *pki {
	t.Helper()
	dir := t.TempDir()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test-ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	issue := func(serial int64, cn string, usage x509.ExtKeyUsage, ips []net.IP) ([]byte, []byte) {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage}, IPAddresses: ips,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		keyDER, _ := x509.MarshalECPrivateKey(key)
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
			pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	}
	p := &pki{dir: dir}
	p.caPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	serverCert, serverKey := issue(2, "kubelet", x509.ExtKeyUsageServerAuth, []net.IP{net.ParseIP("127.0.0.1")})
	p.clientCertPEM, p.clientKeyP = issue(3, "kube-apiserver-kubelet-client", x509.ExtKeyUsageClientAuth, nil)
	write := func(name string, data []byte) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	p.caFile = write("ca.crt", p.caPEM)
	p.certFile, p.keyFile = write("kubelet.crt", serverCert), write("kubelet.key", serverKey)
	p.clientCertFile, p.clientKeyFile = write("client.crt", p.clientCertPEM), write("client.key", p.clientKeyP)
	return p
}

// fixture: the server over TLS with a state directory, and an HTTP client holding the API server's certificate.
type fixture struct {
	t      *testing.T
	pki    *pki
	state  string
	srv    *httptest.Server
	client *http.Client
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	p := newPKI(t)
	f := &fixture{t: t, pki: p, state: t.TempDir()}
	tlsConfig, err := TLSConfig(p.certFile, p.keyFile, p.caFile)
	if err != nil {
		t.Fatal(err)
	}
	handler, err := New(f.state, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { handler.Close() })
	f.srv = httptest.NewUnstartedServer(handler)
	f.srv.TLS = tlsConfig
	f.srv.StartTLS()
	t.Cleanup(f.srv.Close)
	f.client = &http.Client{Transport: &http.Transport{TLSClientConfig: f.clientTLS()}, Timeout: 20 * time.Second}
	return f
}

func (f *fixture) clientTLS() *tls.Config {
	cert, err := tls.X509KeyPair(f.pki.clientCertPEM, f.pki.clientKeyP)
	if err != nil {
		f.t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(f.pki.caPEM)
	return &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool}
}

// writeState writes a pod's state file as the process kubelet does (temp file + rename).
func (f *fixture) writeState(namespace, pod string, state PodState) {
	f.t.Helper()
	dir := filepath.Join(f.state, "pods", namespace)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		f.t.Fatal(err)
	}
	data, _ := json.Marshal(state)
	tmp := filepath.Join(dir, "."+pod+".tmp")
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		f.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, pod+".json")); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fixture) get(path string) (int, string) {
	f.t.Helper()
	resp, err := f.client.Get(f.srv.URL + path)
	if err != nil {
		f.t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

func TestHealthzAndClientCertificate(t *testing.T) {
	f := newFixture(t)
	if code, body := f.get("/healthz"); code != 200 || body != "ok" {
		t.Fatalf("healthz: %d %q", code, body)
	}
	// Without a client certificate the TLS handshake fails: only the API server may call.
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(f.pki.caPEM)
	anon := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	if resp, err := anon.Get(f.srv.URL + "/healthz"); err == nil {
		resp.Body.Close()
		t.Fatalf("a request without a client certificate was answered: %s", resp.Status)
	}
}

func TestContainerLogs(t *testing.T) {
	f := newFixture(t)
	logs := t.TempDir()
	current, previous := filepath.Join(logs, "current.log"), filepath.Join(logs, "previous.log")
	os.WriteFile(current, []byte("one\ntwo\nthree\nfour\n"), 0o644)
	os.WriteFile(previous, []byte("crashed\n"), 0o644)
	f.writeState("ns", "pod-0", PodState{UID: "u1", IP: "127.0.0.1", Containers: map[string]ContainerState{
		"main":  {Log: current, PreviousLog: &previous, Running: false},
		"first": {Log: filepath.Join(logs, "never-written.log")},
	}})

	cases := []struct {
		query string
		code  int
		body  string
	}{
		{"", 200, "one\ntwo\nthree\nfour\n"},
		{"?tailLines=2", 200, "three\nfour\n"},
		{"?tailLines=0", 200, ""},
		{"?tailLines=10", 200, "one\ntwo\nthree\nfour\n"},
		{"?tail=1", 200, "four\n"},
		{"?tail=all", 200, "one\ntwo\nthree\nfour\n"},
		{"?limitBytes=6", 200, "one\ntw"},
		{"?tailLines=2&limitBytes=3", 200, "thr"},
		{"?previous=true", 200, "crashed\n"},
		{"?follow=true", 200, "one\ntwo\nthree\nfour\n"}, // not running: ends at the end of the file
		{"?timestamps=true&sinceSeconds=10", 200, "one\ntwo\nthree\nfour\n"},
		{"?tailLines=-1", 422, ""},
		{"?limitBytes=0", 422, ""},
		{"?follow=maybe", 400, ""},
		{"?tailLines=x", 400, ""},
		{"?sinceSeconds=5&sinceTime=2026-01-01T00:00:00Z", 422, ""},
	}
	for _, c := range cases {
		code, body := f.get("/containerLogs/ns/pod-0/main" + c.query)
		if code != c.code || (c.code == 200 && body != c.body) {
			t.Errorf("%q: got %d %q, want %d %q", c.query, code, body, c.code, c.body)
		}
	}
	if code, body := f.get("/containerLogs/ns/pod-0/first"); code != 200 || body != "" {
		t.Errorf("a log not written yet: %d %q", code, body)
	}
	for path, want := range map[string]string{
		"/containerLogs/ns/nope/main":       `pod "nope" does not exist`,
		"/containerLogs/ns/pod-0/nope":      `container "nope" not found in pod "pod-0"`,
		"/containerLogs/other/pod-0/main":   `pod "pod-0" does not exist`,
		"/containerLogs/ns/..%2fpod-0/main": `does not exist`,
	} {
		if code, body := f.get(path); code != 404 || !strings.Contains(body, want) {
			t.Errorf("%s: %d %q, want 404 %q", path, code, body, want)
		}
	}
	f.writeState("ns", "pod-1", PodState{UID: "u2", Containers: map[string]ContainerState{"main": {Log: current, Running: true}}})
	if code, body := f.get("/containerLogs/ns/pod-1/main?previous=true"); code != 400 || !strings.Contains(body, `previous terminated container "main" in pod "pod-1" not found`) {
		t.Errorf("previous without one: %d %q", code, body)
	}
}

// TestContainerLogsFollow: bytes appended while the container runs arrive as they are written, and the stream
// ends once the state says the container stopped and the file is drained.
func TestContainerLogsFollow(t *testing.T) {
	f := newFixture(t)
	path := filepath.Join(t.TempDir(), "current.log")
	os.WriteFile(path, []byte("old-1\nold-2\n"), 0o644)
	state := PodState{UID: "u1", IP: "127.0.0.1", Containers: map[string]ContainerState{"main": {Log: path, Running: true}}}
	f.writeState("ns", "pod-0", state)

	resp, err := f.client.Get(f.srv.URL + "/containerLogs/ns/pod-0/main?follow=true&tailLines=1")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	lines := make(chan string, 10)
	done := make(chan error, 1)
	go func() {
		r := bufio.NewReader(resp.Body)
		for {
			line, err := r.ReadString('\n')
			if line != "" {
				lines <- line
			}
			if err != nil {
				close(lines)
				done <- err
				return
			}
		}
	}()
	expect := func(want string) {
		t.Helper()
		select {
		case got := <-lines:
			if got != want {
				t.Fatalf("got %q, want %q", got, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no %q within 5 s", want)
		}
	}
	expect("old-2\n")
	appendLine := func(s string) {
		file, _ := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0o644)
		file.WriteString(s)
		file.Close()
	}
	appendLine("new-1\n")
	expect("new-1\n")
	appendLine("last\n")
	state.Containers["main"] = ContainerState{Log: path, Running: false}
	f.writeState("ns", "pod-0", state)
	expect("last\n")
	select {
	case err := <-done:
		if err != io.EOF {
			t.Fatalf("stream ended with %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the follow did not end after the container stopped")
	}
}

// echoServer answers every connection with "echo:" + what it read, until the client half-closes.
func echoServer(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) {
				defer c.Close()
				c.Write([]byte("echo:"))
				io.Copy(c, c)
			}(c)
		}
	}()
	return l.Addr().(*net.TCPAddr).Port
}

// TestPortForward proves a byte stream round-trips through /portForward with client-go's port-forward client, the
// one kubectl uses: over SPDY, and over the websocket tunnel a recent kubectl tries first (here straight to this
// server, as the API server forwards it when the node takes websockets; otherwise the API server itself unwraps it
// and sends SPDY). The lead's e2e runs `kubectl port-forward` through the real API server.
func TestPortForward(t *testing.T) {
	f := newFixture(t)
	port := echoServer(t)
	f.writeState("ns", "tb-0", PodState{UID: "uid-1", IP: "127.0.0.1", Containers: map[string]ContainerState{}})

	restConfig := &rest.Config{
		Host: f.srv.URL,
		TLSClientConfig: rest.TLSClientConfig{
			CAData: f.pki.caPEM, CertData: f.pki.clientCertPEM, KeyData: f.pki.clientKeyP,
		},
	}
	target, _ := url.Parse(f.srv.URL + "/portForward/ns/tb-0/uid-1")
	spdyTransport, upgrader, err := spdy.RoundTripperFor(restConfig)
	if err != nil {
		t.Fatal(err)
	}
	spdyDialer := spdy.NewDialer(upgrader, &http.Client{Transport: spdyTransport}, "POST", target)
	wsDialer, err := portforward.NewSPDYOverWebsocketDialer(target, restConfig)
	if err != nil {
		t.Fatal(err)
	}
	for mode, dialer := range map[string]httpstream.Dialer{"spdy": spdyDialer, "websocket": wsDialer} {
		t.Run(mode, func(t *testing.T) { roundTrip(t, dialer, port) })
	}

	// A pod that is not there, or another pod under the same name: 404, as the kubelet answers.
	for path, want := range map[string]string{"/portForward/ns/nope": "pod does not exist", "/portForward/ns/tb-0/uid-2": "pod not found"} {
		if code, body := f.get(path); code != 404 || !strings.Contains(body, want) {
			t.Errorf("%s: %d %q", path, code, body)
		}
	}
}

// roundTrip forwards a local port to the echo server's port in the pod and sends bytes through it, twice over the
// same forwarder (two connections on one SPDY session).
func roundTrip(t *testing.T, dialer httpstream.Dialer, port int) {
	t.Helper()
	stop, ready := make(chan struct{}), make(chan struct{})
	var out, errOut strings.Builder
	pf, err := portforward.NewOnAddresses(dialer, []string{"127.0.0.1"}, []string{fmt.Sprintf("0:%d", port)}, stop, ready, &out, &errOut)
	if err != nil {
		t.Fatal(err)
	}
	forwardErr := make(chan error, 1)
	go func() { forwardErr <- pf.ForwardPorts() }()
	select {
	case <-ready:
	case err := <-forwardErr:
		t.Fatalf("port-forward ended before ready: %v (%s)", err, errOut.String())
	case <-time.After(10 * time.Second):
		t.Fatal("port-forward not ready within 10 s")
	}
	defer func() {
		close(stop)
		<-forwardErr
	}()
	ports, err := pf.GetPorts()
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", ports[0].Local))
		if err != nil {
			t.Fatal(err)
		}
		payload := strings.Repeat(fmt.Sprintf("payload %d ", i), 10000) // 100 kB: several frames
		go func() {
			conn.Write([]byte(payload))
			conn.(*net.TCPConn).CloseWrite()
		}()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		got, err := io.ReadAll(conn)
		conn.Close()
		if err != nil {
			t.Fatalf("connection %d: %v (%s)", i, err, errOut.String())
		}
		if string(got) != "echo:"+payload {
			t.Fatalf("connection %d: got %d bytes %.40q..., want %d", i, len(got), got, len(payload)+5)
		}
	}
}
