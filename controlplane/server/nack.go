package server

import (
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/meshlet/meshlet/xds"
)

// resourceKinds are the words meshlet's sidecar puts before the quoted name
// of a resource of each type in a NACK's error detail
// (`route configuration "api": virtual_hosts[0]...`, see sidecar/config).
var resourceKinds = map[string][]string{
	xds.ListenerType: {"listener"},
	xds.RouteType:    {"route configuration"},
	xds.ClusterType:  {"cluster"},
	xds.EndpointType: {"cluster load assignment"},
	xds.SecretType:   {"secret"},
}

// quoted matches a Go-quoted string (%q), escapes included.
var quoted = regexp.MustCompile(`"(?:[^"\\]|\\.)*"`)

// NACKResources returns the resources a NACK's error detail blames, out of
// names, the resources of typeURL in the rejected snapshot. It looks, in
// order, for:
//  1. quoted names after the kind word of typeURL, the form meshlet's
//     sidecar uses (`route configuration "api": ...`, `cluster "api": ...`;
//     several errors may be joined in one detail);
//  2. any quoted string equal to one of names (other xDS clients);
//
// and returns the matches (in the order of names, without duplicates) and
// true. When the detail names none of them it returns every name and false:
// the whole type is suspect.
func NACKResources(typeURL, detail string, names []string) (blamed []string, named bool) {
	known := map[string]bool{}
	for _, n := range names {
		known[n] = true
	}
	kinded, loose := map[string]bool{}, map[string]bool{}
	for _, loc := range quoted.FindAllStringIndex(detail, -1) {
		name, err := strconv.Unquote(detail[loc[0]:loc[1]])
		if err != nil || !known[name] {
			continue
		}
		loose[name] = true
		before := strings.TrimRight(detail[:loc[0]], " ")
		for _, kind := range resourceKinds[typeURL] {
			rest, ok := strings.CutSuffix(before, kind)
			if ok && (rest == "" || !isWordByte(rest[len(rest)-1])) {
				kinded[name] = true
			}
		}
	}
	pick := func(set map[string]bool) []string {
		var out []string
		for _, n := range names {
			if set[n] && !slices.Contains(out, n) {
				out = append(out, n)
			}
		}
		return out
	}
	if len(kinded) > 0 {
		return pick(kinded), true
	}
	if len(loose) > 0 {
		return pick(loose), true
	}
	return slices.Clone(names), false
}

func isWordByte(b byte) bool {
	return b == '_' || b == '-' || ('a' <= b && b <= 'z') || ('A' <= b && b <= 'Z') || ('0' <= b && b <= '9')
}
