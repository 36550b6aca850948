package testutil

import (
	"bufio"
	"fmt"
	"net"
	"testing"
	"time"
)

// TestServeTCP: each connection gets its handler; a handler blocked on
// its connection ends at cleanup (the connection is closed).
func TestServeTCP(t *testing.T) {
	blocked := make(chan struct{})
	t.Run("serve", func(t *testing.T) {
		addr := ServeTCP(t, func(c net.Conn) {
			sc := bufio.NewScanner(c)
			for sc.Scan() {
				fmt.Fprintf(c, "echo %s\n", sc.Text())
			}
			close(blocked) // reached only once the connection is closed
		})
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintln(c, "hi")
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil || line != "echo hi\n" {
			t.Fatalf("answer %q, %v", line, err)
		}
	})
	select {
	case <-blocked:
	default:
		t.Error("the handler still runs after cleanup")
	}
}
