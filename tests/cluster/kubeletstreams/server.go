// Package kubeletstreams serves the part of the kubelet's HTTPS API that the API server proxies `kubectl logs` and
// `kubectl port-forward` to, for pods that the process kubelet of tests/cluster (Python) runs as local processes.
// That kubelet reports this server's port as each Node's status.daemonEndpoints.kubeletEndpoint.Port, and writes
// what this server needs to know about each pod into a state directory (see PodState).
//
// Endpoints (paths as in k8s.io/kubernetes pkg/kubelet/server/server.go):
//
//	GET  /containerLogs/{namespace}/{pod}/{container}   logs, see logOptions for the query
//	GET|POST /portForward/{namespace}/{pod}[/{uid}]     port-forward (SPDY, websocket tunnel), see portForward
//	GET  /healthz                                       "ok"
//
// Every request must present a client certificate signed by --client-ca-file: only the API server (its
// --kubelet-client-certificate) may call, as with a kubelet that does not allow anonymous requests.
package kubeletstreams

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"syscall"
	"time"
)

type server struct {
	state     stateDir
	logf      func(format string, args ...any)
	streaming *streamingServer
}

// Server is the kubelet's streaming API for the pods described under a state directory.
type Server struct {
	http.Handler
	s *server
}

// New starts the internal streaming server (see streamingServer) and returns the routes; Close stops it.
func New(dir string, logf func(format string, args ...any)) (*Server, error) {
	s := &server{state: stateDir(dir), logf: logf}
	var err error
	if s.streaming, err = startStreamingServer(s); err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok")) })
	mux.HandleFunc("GET /containerLogs/{namespace}/{pod}/{container}", s.containerLogs)
	for _, p := range []string{"/portForward/{namespace}/{pod}", "/portForward/{namespace}/{pod}/{uid}"} {
		mux.HandleFunc("GET "+p, s.portForward)
		mux.HandleFunc("POST "+p, s.portForward)
	}
	return &Server{Handler: mux, s: s}, nil
}

// Close stops the internal streaming server and the port-forwards it carries.
func (srv *Server) Close() error { return srv.s.streaming.srv.Close() }

// writeStateError answers 404 for a pod or container this node does not run, 500 for a state file it cannot read.
func writeStateError(w http.ResponseWriter, err error) {
	if errors.Is(err, errNotFound) {
		// The kubelet's messages: `pod "x" does not exist`, `container "c" not found in pod "x"`.
		http.Error(w, trimNotFound(err), http.StatusNotFound)
		return
	}
	http.Error(w, err.Error(), http.StatusInternalServerError)
}

// trimNotFound drops the ": not found" that marks the error kind.
func trimNotFound(err error) string {
	msg := err.Error()
	suffix := ": " + errNotFound.Error()
	if len(msg) > len(suffix) && msg[len(msg)-len(suffix):] == suffix {
		return msg[:len(msg)-len(suffix)]
	}
	return msg
}

// TLSConfig serves certFile/keyFile and requires a client certificate signed by one of the CAs in clientCAFile.
// HTTP/1.1 only: the SPDY and websocket upgrades of port-forward need it, and the API server asks for it.
func TLSConfig(certFile, keyFile, clientCAFile string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("serving certificate: %w", err)
	}
	pem, err := os.ReadFile(clientCAFile)
	if err != nil {
		return nil, fmt.Errorf("client CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("client CA %s: no PEM certificate in it", clientCAFile)
	}
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
		MinVersion:   tls.VersionTLS12,
		NextProtos:   []string{"http/1.1"},
	}, nil
}

// Main is `kubeplane kubelet-streams ARGS`. It serves until SIGTERM or SIGINT and returns the exit code.
func Main(args []string) int {
	flags := flag.NewFlagSet("kubelet-streams", flag.ContinueOnError)
	listen := flags.String("listen", "127.0.0.1:10250", "address to serve HTTPS on (host:port; port 0 picks a free one, printed at start)")
	certFile := flags.String("tls-cert-file", "", "serving certificate (PEM), for the address the Node reports (127.0.0.1)")
	keyFile := flags.String("tls-private-key-file", "", "serving certificate's private key (PEM)")
	clientCA := flags.String("client-ca-file", "", "CA bundle (PEM) that signs the API server's kubelet client certificate")
	stateDir := flags.String("state-dir", "", "the process kubelet's state directory (pods/<namespace>/<pod>.json)")
	if err := flags.Parse(args); err != nil {
		return 2
	}
	var missing []string
	for name, value := range map[string]string{"tls-cert-file": *certFile, "tls-private-key-file": *keyFile, "client-ca-file": *clientCA, "state-dir": *stateDir} {
		if value == "" {
			missing = append(missing, "--"+name)
		}
	}
	if len(missing) > 0 {
		sort.Strings(missing)
		fmt.Fprintf(os.Stderr, "kubelet-streams: required: %v\n", missing)
		return 2
	}
	logger := log.New(os.Stderr, "kubelet-streams: ", log.LstdFlags|log.Lmicroseconds)
	tlsConfig, err := TLSConfig(*certFile, *keyFile, *clientCA)
	if err != nil {
		logger.Print(err)
		return 1
	}
	handler, err := New(*stateDir, logger.Printf)
	if err != nil {
		logger.Print(err)
		return 1
	}
	defer handler.Close()
	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		logger.Print(err)
		return 1
	}
	srv := &http.Server{
		Handler:           handler,
		TLSConfig:         tlsConfig,
		ReadHeaderTimeout: 30 * time.Second,
		ErrorLog:          logger,
		// An empty map turns HTTP/2 off (see TLSConfig).
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go func() {
		<-ctx.Done()
		_ = srv.Close()
	}()
	logger.Printf("serving on https://%s (state %s)", listener.Addr(), *stateDir)
	if err := srv.ServeTLS(listener, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
		logger.Print(err)
		return 1
	}
	return 0
}
