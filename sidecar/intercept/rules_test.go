package intercept

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// optionSet is a configuration whose iptables-save output is kept in
// testdata/: the command's flags and the same Config.
type optionSet struct {
	name string
	args []string
	cfg  Config
}

// golden names the set's testdata file for family f.
func (s optionSet) golden(f Family) string {
	return "save-" + s.name + "." + strings.ToLower(f.String()) + ".golden"
}

// optionSets: the defaults, every exclusion (addresses of the namespace
// tests' peer), inbound off, and Linkerd's ports and uid.
func optionSets() []optionSet {
	return []optionSet{
		{name: "defaults"},
		{
			name: "exclusions",
			args: []string{
				"-exclude-outbound-ports", "5432,7000-7010",
				"-exclude-outbound-cidrs", "198.18.0.0/15,fd00:b::/64",
				"-exclude-inbound-ports", "9090",
				"-exclude-uids", "2000",
				"-kube-api-servers", "10.77.0.1:443,[fd00:77::1]:443",
			},
			cfg: Config{
				ExcludeOutboundPorts: []PortRange{{5432, 5432}, {7000, 7010}},
				ExcludeOutboundCIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.0.0/15"), netip.MustParsePrefix("fd00:b::/64")},
				ExcludeInboundPorts:  []PortRange{{9090, 9090}},
				ExcludeUIDs:          []uint32{2000},
				KubeAPIServers:       []netip.AddrPort{netip.MustParseAddrPort("10.77.0.1:443"), netip.MustParseAddrPort("[fd00:77::1]:443")},
			},
		},
		{name: "inbound-none", args: []string{"-inbound", "none"}, cfg: Config{Inbound: InboundNone}},
		{
			name: "custom-ports",
			args: []string{"-proxy-uid", "2102", "-outbound-port", "4140", "-inbound-port", "4143"},
			cfg:  Config{ProxyUID: 2102, OutboundPort: 4140, InboundPort: 4143},
		},
	}
}

// TestRulesAreWhatIptablesSaves: the rule lines Rules writes (what -dry-run
// prints) are, in order, those iptables-save printed back after the real
// command applied them (the golden files of TestGoldenSave). So the rules
// need no root to review, and Apply's check for an existing jump compares
// like with like.
func TestRulesAreWhatIptablesSaves(t *testing.T) {
	for _, set := range optionSets() {
		for _, f := range []Family{IPv4, IPv6} {
			t.Run(set.name+"/"+f.String(), func(t *testing.T) {
				rules, err := Rules(set.cfg, f)
				if err != nil {
					t.Fatal(err)
				}
				saved, err := os.ReadFile(filepath.Join("testdata", set.golden(f)))
				if err != nil {
					t.Fatalf("%v (the namespace test TestGoldenSave writes it with -update)", err)
				}
				got, want := ruleLines(rules), ruleLines(string(saved))
				if !reflect.DeepEqual(got, want) {
					t.Errorf("Rules:\n%s\niptables-save (%s):\n%s", strings.Join(got, "\n"), set.golden(f), strings.Join(want, "\n"))
				}
				for _, line := range got {
					if !strings.Contains(line, `--comment "`+CommentPrefix) {
						t.Errorf("rule without a meshlet comment: %s", line)
					}
				}
			})
		}
	}
}

func ruleLines(s string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, "-A ") {
			out = append(out, l)
		}
	}
	return out
}

func TestRulesRejectsInvalidConfig(t *testing.T) {
	if _, err := Rules(Config{OutboundPort: 70000}, IPv4); err == nil || !strings.Contains(err.Error(), "OutboundPort 70000") {
		t.Errorf("err = %v, want the OutboundPort named", err)
	}
}

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		want string // substring of the error; "" for valid
	}{
		{"zero value", Config{}, ""},
		{"same capture ports", Config{OutboundPort: 15006}, "OutboundPort and InboundPort are both 15006"},
		{"inbound port range", Config{InboundPort: -1}, "InboundPort -1 is not a port"},
		{"sidecar port", Config{SidecarPorts: []int{0}}, "SidecarPorts: 0 is not a port"},
		{"inbound mode", Config{Inbound: "some"}, `Inbound "some"`},
		{"inverted range", Config{ExcludeOutboundPorts: []PortRange{{10, 5}}}, "ExcludeOutboundPorts: port range 10-5"},
		{"inbound range", Config{ExcludeInboundPorts: []PortRange{{0, 5}}}, "ExcludeInboundPorts: port range 0-5"},
		{"invalid prefix", Config{ExcludeOutboundCIDRs: []netip.Prefix{{}}}, "ExcludeOutboundCIDRs"},
		{"API server without port", Config{KubeAPIServers: []netip.AddrPort{netip.AddrPortFrom(netip.MustParseAddr("10.96.0.1"), 0)}}, "KubeAPIServers"},
		{"no sidecar ports", Config{SidecarPorts: []int{}}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.cfg.Validate()
			switch {
			case tt.want == "" && err != nil:
				t.Errorf("unexpected error %v", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Errorf("err = %v, want one containing %q", err, tt.want)
			case err != nil && !strings.HasPrefix(err.Error(), "intercept: config: "):
				t.Errorf("err %q lacks the package prefix", err)
			}
		})
	}
}

func TestWithDefaults(t *testing.T) {
	c := Config{}.WithDefaults()
	want := Config{ProxyUID: 1337, OutboundPort: 15001, InboundPort: 15006, SidecarPorts: []int{15020, 19000, 20000}, Inbound: InboundAll}
	if !reflect.DeepEqual(c, want) {
		t.Errorf("defaults %+v, want %+v", c, want)
	}
	if c := (Config{SidecarPorts: []int{}}).WithDefaults(); len(c.SidecarPorts) != 0 {
		t.Errorf("an empty SidecarPorts became %v", c.SidecarPorts)
	}
}

func TestParseLists(t *testing.T) {
	t.Run("ports", func(t *testing.T) {
		tests := []struct {
			in   string
			want []PortRange
			err  string
		}{
			{"", nil, ""},
			{" 5432, 6379 ,7000-7010,", []PortRange{{5432, 5432}, {6379, 6379}, {7000, 7010}}, ""},
			{"0", nil, `ports "0"`},
			{"65536", nil, "not a port"},
			{"10-5", nil, "port range 10-5"},
			{"a", nil, `"a" is not a port`},
			{"5-", nil, `ports "5-"`},
		}
		for _, tt := range tests {
			got, err := ParsePorts(tt.in)
			if !errMatches(err, tt.err) || !reflect.DeepEqual(got, tt.want) {
				t.Errorf("ParsePorts(%q) = %v, %v; want %v, error with %q", tt.in, got, err, tt.want, tt.err)
			}
		}
	})
	t.Run("cidrs", func(t *testing.T) {
		tests := []struct {
			in   string
			want []string
			err  string
		}{
			{"", nil, ""},
			{"10.1.2.3/8, fd00::5/8,192.168.1.1,::ffff:10.0.0.1,2001:db8::1", []string{"10.0.0.0/8", "fd00::/8", "192.168.1.1/32", "10.0.0.1/32", "2001:db8::1/128"}, ""},
			{"10.0.0.0/33", nil, `CIDR "10.0.0.0/33"`},
			{"host", nil, `CIDR "host"`},
		}
		for _, tt := range tests {
			got, err := ParseCIDRs(tt.in)
			var s []string
			for _, p := range got {
				s = append(s, p.String())
			}
			if !errMatches(err, tt.err) || !reflect.DeepEqual(s, tt.want) {
				t.Errorf("ParseCIDRs(%q) = %v, %v; want %v, error with %q", tt.in, s, err, tt.want, tt.err)
			}
		}
	})
	t.Run("uids", func(t *testing.T) {
		if got, err := ParseUIDs("0, 1000,4294967295"); err != nil || !reflect.DeepEqual(got, []uint32{0, 1000, 4294967295}) {
			t.Errorf("ParseUIDs = %v, %v", got, err)
		}
		if _, err := ParseUIDs("4294967296"); !errMatches(err, `uid "4294967296"`) {
			t.Errorf("ParseUIDs(4294967296) error %v", err)
		}
		if _, err := ParseUIDs("root"); !errMatches(err, `uid "root" is not a number`) {
			t.Errorf("ParseUIDs(root) error %v", err)
		}
	})
	t.Run("addresses", func(t *testing.T) {
		got, err := ParseAddrPorts("10.96.0.1:443, [fd00::1]:6443")
		if err != nil || len(got) != 2 || got[0].String() != "10.96.0.1:443" || got[1].String() != "[fd00::1]:6443" {
			t.Errorf("ParseAddrPorts = %v, %v", got, err)
		}
		for _, bad := range []string{"10.96.0.1", "kubernetes:443", "10.96.0.1:0"} {
			if _, err := ParseAddrPorts(bad); !errMatches(err, "want ip:port") {
				t.Errorf("ParseAddrPorts(%q) error %v", bad, err)
			}
		}
	})
	t.Run("backend", func(t *testing.T) {
		for in, want := range map[string]Backend{"": BackendAuto, "auto": BackendAuto, "nft": BackendNFT, "legacy": BackendLegacy} {
			if got, err := ParseBackend(in); err != nil || got != want {
				t.Errorf("ParseBackend(%q) = %v, %v", in, got, err)
			}
		}
		if _, err := ParseBackend("iptables"); !errMatches(err, `backend "iptables"`) {
			t.Errorf("ParseBackend(iptables) error %v", err)
		}
	})
}

// errMatches: no error wanted and none, or one containing want.
func errMatches(err error, want string) bool {
	if want == "" {
		return err == nil
	}
	return err != nil && strings.Contains(err.Error(), want)
}

func TestDetectionChoice(t *testing.T) {
	broken := errors.New("broken")
	tests := []struct {
		name     string
		rules    map[Backend]int
		unusable map[Backend]error
		want     Backend
	}{
		{"both empty", map[Backend]int{BackendNFT: 0, BackendLegacy: 0}, nil, BackendNFT},
		{"only legacy has rules", map[Backend]int{BackendNFT: 0, BackendLegacy: 3}, nil, BackendLegacy},
		{"only nft has rules", map[Backend]int{BackendNFT: 3, BackendLegacy: 0}, nil, BackendNFT},
		{"legacy has more", map[Backend]int{BackendNFT: 2, BackendLegacy: 30}, nil, BackendLegacy},
		{"nft has more", map[Backend]int{BackendNFT: 30, BackendLegacy: 2}, nil, BackendNFT},
		{"tie", map[Backend]int{BackendNFT: 5, BackendLegacy: 5}, nil, BackendNFT},
		{"nft does not work", map[Backend]int{BackendLegacy: 0}, map[Backend]error{BackendNFT: broken}, BackendLegacy},
		{"legacy does not work", map[Backend]int{BackendNFT: 0}, map[Backend]error{BackendLegacy: broken}, BackendNFT},
		{"neither works", map[Backend]int{}, map[Backend]error{BackendNFT: broken, BackendLegacy: broken}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := Detection{Rules: tt.rules, Unusable: tt.unusable}
			err := d.choose()
			if tt.want == "" {
				if err == nil || !errors.Is(err, broken) {
					t.Errorf("err = %v, want both backends' errors", err)
				}
				return
			}
			if err != nil || d.Backend != tt.want || d.Reason == "" {
				t.Errorf("chose %q (%q), %v; want %q", d.Backend, d.Reason, err, tt.want)
			}
		})
	}
}

func TestSaveParsing(t *testing.T) {
	const save = `# Generated by iptables-nft-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [3:180]
[2:120] -A INPUT -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [7:420]
:MESHLET_OUTBOUND - [0:0]
[1:60] -A OUTPUT -p tcp -m comment --comment "meshlet: outbound TCP goes through MESHLET_OUTBOUND" -j MESHLET_OUTBOUND
[0:0] -A MESHLET_OUTBOUND -o lo -m comment --comment "meshlet: x" -j RETURN
[5:300] -A MESHLET_OUTBOUND -p tcp -m comment --comment "meshlet: redirect outbound TCP to the outbound capture port 15001" -j REDIRECT --to-ports 15001
COMMIT
`
	if n := countRules(save, ""); n != 4 {
		t.Errorf("countRules(all) = %d, want 4", n)
	}
	if n := countRules(save, "nat"); n != 3 {
		t.Errorf("countRules(nat) = %d, want 3", n)
	}
	if n, err := ruleCounter(save, ChainOutbound, outboundRedirectComment(15001)); err != nil || n != 5 {
		t.Errorf("ruleCounter = %d, %v; want 5", n, err)
	}
	if _, err := ruleCounter(save, ChainOutbound, outboundRedirectComment(4140)); !errors.Is(err, errNoRule) {
		t.Errorf("ruleCounter of a missing rule: %v", err)
	}
	if !hasJump(save, "OUTPUT", ChainOutbound) || hasJump(save, "PREROUTING", ChainInbound) {
		t.Error("hasJump: wrong answer")
	}
}

func TestPickProbe(t *testing.T) {
	c := Config{}.WithDefaults()
	if p, ok := pickProbe(c, IPv4); !ok || p.String() != "192.0.2.1:9" {
		t.Errorf("default IPv4 probe %v %v", p, ok)
	}
	if p, ok := pickProbe(c, IPv6); !ok || p.String() != "[2001:db8::1]:9" {
		t.Errorf("default IPv6 probe %v %v", p, ok)
	}
	c.ExcludeOutboundCIDRs, _ = ParseCIDRs("192.0.2.0/24,2001:db8::/32")
	c.ExcludeOutboundPorts, _ = ParsePorts("1-10")
	if p, ok := pickProbe(c, IPv4); !ok || p.String() != "198.51.100.1:11" {
		t.Errorf("IPv4 probe with exclusions %v %v", p, ok)
	}
	if p, ok := pickProbe(c, IPv6); !ok || p.String() != "[3fff::1]:11" {
		t.Errorf("IPv6 probe with exclusions %v %v", p, ok)
	}
	c.ExcludeOutboundCIDRs, _ = ParseCIDRs("0.0.0.0/0")
	if p, ok := pickProbe(c, IPv4); ok {
		t.Errorf("probe %v although every IPv4 address is excluded", p)
	}
}
