package meshkube

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// JaegerQueryURL waits (at most timeout) until the in-cluster Jaeger
// (deploy/kubernetes/components/jaeger, in the dev overlay) is available
// and returns its query API's base URL, http://<ClusterIP>:16686: reachable
// in the cluster's network namespace (Cluster.DialContext, `ip netns exec`),
// e.g. as `controlplane trace -jaeger-url`. From this process's namespace,
// go through Forward.
func (e *Env) JaegerQueryURL(ctx context.Context, timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	for {
		d, err := e.Client().AppsV1().Deployments(Namespace).Get(ctx, JaegerService, metav1.GetOptions{})
		switch {
		case err != nil:
			last = err
		case d.Status.AvailableReplicas < 1:
			last = fmt.Errorf("deployment %s/%s: %d of %d replicas available", Namespace, JaegerService, d.Status.AvailableReplicas, d.Status.Replicas)
		default:
			svc, err := e.Client().CoreV1().Services(Namespace).Get(ctx, JaegerService, metav1.GetOptions{})
			if err != nil {
				return "", fmt.Errorf("meshkube: jaeger: %w", err)
			}
			return "http://" + net.JoinHostPort(svc.Spec.ClusterIP, strconv.Itoa(JaegerQueryPort)), nil
		}
		select {
		case <-ctx.Done():
			pods, _ := e.Cluster.Kubectl(context.Background(), "-n", Namespace, "get", "pods", "-o", "wide")
			logs, _ := e.Cluster.Kubectl(context.Background(), "-n", Namespace, "logs", "deploy/"+JaegerService, "--tail=20")
			return "", fmt.Errorf("meshkube: jaeger not available after %v: %v\n%s\n%s", timeout, last, pods, logs)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// Forwarder relays connections made to a loopback port of this process's
// network namespace to an address dialed in the cluster's (what kubectl
// port-forward does for a Service): tools that dial from the host, such
// as controlplane/traceview or `controlplane trace -jaeger-url`, reach the
// cluster through it.
type Forwarder struct {
	// Addr is the local address, 127.0.0.1:<port>.
	Addr string

	target string
	ln     net.Listener
	dial   func(ctx context.Context, network, addr string) (net.Conn, error)
	ctx    context.Context // cancelled by Close: ends pending dials
	cancel context.CancelFunc
	wg     sync.WaitGroup // the accept loop and every relay
	mu     sync.Mutex     // guards conns and closed
	conns  map[net.Conn]struct{}
	closed bool
}

// Forward listens on a free port of 127.0.0.1 and relays every connection
// to target (host:port, e.g. a ClusterIP's) dialed in the cluster's
// network namespace, until Close.
func (e *Env) Forward(target string) (*Forwarder, error) {
	return forward(target, e.Cluster.DialContext)
}

func forward(target string, dial func(ctx context.Context, network, addr string) (net.Conn, error)) (*Forwarder, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("meshkube: forward %s: %w", target, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	f := &Forwarder{Addr: ln.Addr().String(), target: target, ln: ln, dial: dial,
		ctx: ctx, cancel: cancel, conns: map[net.Conn]struct{}{}}
	f.wg.Add(1)
	go f.accept()
	return f, nil
}

func (f *Forwarder) accept() {
	defer f.wg.Done()
	for {
		c, err := f.ln.Accept()
		if err != nil {
			return // closed
		}
		if !f.track(c) {
			c.Close()
			return
		}
		f.wg.Add(1)
		go f.relay(c)
	}
}

// track records c for Close; false once closed.
func (f *Forwarder) track(c net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return false
	}
	f.conns[c] = struct{}{}
	return true
}

func (f *Forwarder) untrack(c net.Conn) {
	f.mu.Lock()
	delete(f.conns, c)
	f.mu.Unlock()
	c.Close()
}

func (f *Forwarder) relay(local net.Conn) {
	defer f.wg.Done()
	defer f.untrack(local)
	ctx, cancel := context.WithTimeout(f.ctx, 10*time.Second)
	remote, err := f.dial(ctx, "tcp", f.target)
	cancel()
	if err != nil {
		return
	}
	if !f.track(remote) {
		remote.Close()
		return
	}
	defer f.untrack(remote)
	done := make(chan struct{})
	go func() {
		_, _ = io.Copy(remote, local)
		if tc, ok := remote.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
		close(done)
	}()
	_, _ = io.Copy(local, remote)
	if tc, ok := local.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
	}
	<-done
}

// Close stops listening, closes every relayed connection and waits for
// the relays to end. Calling it again does nothing.
func (f *Forwarder) Close() error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil
	}
	f.closed = true
	var conns []net.Conn
	for c := range f.conns {
		conns = append(conns, c)
	}
	f.mu.Unlock()
	f.cancel()
	err := f.ln.Close()
	for _, c := range conns {
		c.Close()
	}
	f.wg.Wait()
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}
