package kubeletstreams

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"path"
	"strconv"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/util/proxy"
	translator "k8s.io/apiserver/pkg/util/proxy"
	"k8s.io/cri-streaming/pkg/streaming/portforward"
	"k8s.io/streaming/pkg/httpstream/wsstream"
)

// The kubelet's defaults for its streaming server (k8s.io/cri-streaming/pkg/streaming DefaultConfig).
const (
	streamIdleTimeout     = 4 * time.Hour
	streamCreationTimeout = 30 * time.Second
)

// portForward serves /portForward/{namespace}/{pod}[/{uid}] as pkg/kubelet/server/server.go getPortForward does:
// it checks the pod, then proxies the upgrade (proxy.UpgradeAwareHandler) to a streaming server that calls the
// upstream portforward.ServePortForward (SPDY, and the older portforward.k8s.io websocket channels). A websocket
// request that tunnels SPDY (what the API server passes through for a recent kubectl when the node declares it
// takes websockets) is unwrapped first by the API server's own TunnelingHandler, exactly as the kubelet wraps it.
// The one difference from the kubelet: its streaming server is the container runtime's; here it is ours (see
// streamingServer), and it dials the pod's IP.
func (s *server) portForward(w http.ResponseWriter, r *http.Request) {
	namespace, pod, uid := r.PathValue("namespace"), r.PathValue("pod"), r.PathValue("uid")
	tunnel := wsstream.IsWebSocketRequestWithTunnelingProtocol(r)
	opts := &portforward.V4Options{}
	if !tunnel {
		var err error
		if opts, err = portforward.NewV4Options(r); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
	}
	state, err := s.state.pod(namespace, pod)
	if err != nil {
		if errors.Is(err, errNotFound) {
			http.Error(w, "pod does not exist", http.StatusNotFound) // the kubelet's words
			return
		}
		writeStateError(w, err)
		return
	}
	if uid != "" && uid != state.UID {
		http.Error(w, "pod not found", http.StatusNotFound)
		return
	}
	location := *s.streaming.base
	location.Path += path.Join("/portforward", namespace, pod, state.UID)
	query := url.Values{}
	for _, port := range opts.Ports {
		query.Add(portforward.PortHeader, strconv.Itoa(int(port)))
	}
	location.RawQuery = query.Encode()
	var handler http.Handler = proxy.NewUpgradeAwareHandler(&location, nil, false, true, responder{s.logf})
	protocol := "spdy"
	if tunnel {
		handler, protocol = translator.NewTunnelingHandler(handler), "spdy over websocket"
	} else if wsstream.IsWebSocketRequest(r) {
		protocol = "websocket channels"
	}
	s.logf("port-forward %s/%s (%s)", namespace, pod, protocol)
	handler.ServeHTTP(w, r)
}

type responder struct{ logf func(string, ...any) }

func (r responder) Error(w http.ResponseWriter, req *http.Request, err error) {
	r.logf("port-forward %s: %v", req.URL.Path, err)
	http.Error(w, err.Error(), http.StatusInternalServerError)
}

// streamingServer stands in for the container runtime's streaming server: plain HTTP on a loopback port, each path
// under a random token (as the runtime's one-time URLs are), reached only through portForward's proxy.
type streamingServer struct {
	base *url.URL
	srv  *http.Server
}

func startStreamingServer(s *server) (*streamingServer, error) {
	token := make([]byte, 16)
	if _, err := rand.Read(token); err != nil {
		return nil, err
	}
	prefix := "/" + hex.EncodeToString(token)
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mux.HandleFunc(prefix+"/portforward/{namespace}/{pod}/{uid}", func(w http.ResponseWriter, r *http.Request) {
		var ports []int32
		for _, p := range r.URL.Query()[portforward.PortHeader] {
			port, err := strconv.ParseUint(p, 10, 16)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			ports = append(ports, int32(port))
		}
		opts, _ := portforward.BuildV4Options(ports)
		name := r.PathValue("namespace") + "/" + r.PathValue("pod")
		portforward.ServePortForward(w, r, dialer{s}, name, r.PathValue("uid"), opts,
			streamIdleTimeout, streamCreationTimeout, portforward.SupportedProtocols)
	})
	ss := &streamingServer{
		base: &url.URL{Scheme: "http", Host: listener.Addr().String(), Path: prefix},
		srv:  &http.Server{Handler: mux, ReadHeaderTimeout: 30 * time.Second},
	}
	go func() { _ = ss.srv.Serve(listener) }()
	return ss, nil
}

// dialer is the PortForwarder: each forwarded connection is a TCP connection to the pod's IP (from its state
// file, read when the connection opens) and the requested port.
type dialer struct{ s *server }

func (d dialer) PortForward(ctx context.Context, name, uid string, port int32, stream io.ReadWriteCloser) error {
	defer stream.Close()
	namespace, pod, _ := strings.Cut(name, "/")
	state, err := d.s.state.pod(namespace, pod)
	if err != nil {
		return err
	}
	if state.UID != uid {
		return fmt.Errorf("pod %s/%s was replaced (uid %s, now %s)", namespace, pod, uid, state.UID)
	}
	address := net.JoinHostPort(state.IP, strconv.Itoa(int(port)))
	var nd net.Dialer
	conn, err := nd.DialContext(ctx, "tcp", address)
	if err != nil {
		// The error stream carries this to kubectl, as the container runtime's message does.
		return fmt.Errorf("failed to connect to %s in pod %s/%s: %w", address, namespace, pod, err)
	}
	defer conn.Close()

	// Client to pod: at the client's end of stream, half-close so the pod sees EOF and can still answer.
	clientDone := make(chan error, 1)
	go func() {
		_, err := io.Copy(conn, stream)
		if tcp, ok := conn.(*net.TCPConn); ok && err == nil {
			_ = tcp.CloseWrite()
		} else {
			_ = conn.Close()
		}
		clientDone <- err
	}()
	// Pod to client: the forwarded connection ends when the pod closes its side (or the stream breaks).
	_, err = io.Copy(stream, conn)
	if err != nil && !errors.Is(err, net.ErrClosed) {
		return err
	}
	select {
	case err := <-clientDone:
		if err != nil && !errors.Is(err, net.ErrClosed) && !errors.Is(err, io.EOF) {
			return err
		}
	default:
	}
	return nil
}
