package devconsul

import (
	"syscall"
	"testing"

	"github.com/hashicorp/consul/api"
)

func TestStartRegisterStop(t *testing.T) {
	a := StartForTest(t)
	reg := &api.AgentServiceRegistration{Name: "probe", ID: "probe-1", Port: 1234, Address: "127.0.0.1"}
	if err := a.Client.Agent().ServiceRegister(reg); err != nil {
		t.Fatal(err)
	}
	entries, _, err := a.Client.Health().Service("probe", "", false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Service.ID != "probe-1" {
		t.Fatalf("entries = %+v, want probe-1", entries)
	}
	pid := a.Pid()
	if err := a.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, 0); err == nil {
		t.Fatalf("consul pid %d still running after Stop", pid)
	}
}
