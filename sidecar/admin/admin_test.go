package admin

import (
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshlet/meshlet/sidecar/config"
)

type emptySource struct{}

func (emptySource) Ready() (bool, string)    { return true, "" }
func (emptySource) ConfigDump() *ConfigDump  { return &ConfigDump{} }
func (emptySource) Listeners() []Listener    { return nil }
func (emptySource) Clusters() []Cluster      { return nil }
func (emptySource) Certs() []config.CertInfo { return nil }

func TestPprofOnlyWithTheFlag(t *testing.T) {
	tests := []struct {
		name  string
		pprof bool
		want  int
	}{
		{name: "off by default", pprof: false, want: http.StatusNotFound},
		{name: "on with -admin-pprof", pprof: true, want: http.StatusOK},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(Handler(emptySource{}, prometheus.NewRegistry(), Options{Pprof: tc.pprof}))
			defer srv.Close()
			for _, path := range []string{"/debug/pprof/", "/debug/pprof/goroutine?debug=1"} {
				resp, err := http.Get(srv.URL + path)
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				if resp.StatusCode != tc.want {
					t.Errorf("GET %s: %d, want %d", path, resp.StatusCode, tc.want)
				}
			}
			resp, err := http.Get(srv.URL + "/ready")
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Errorf("/ready: %d", resp.StatusCode)
			}
		})
	}
}
