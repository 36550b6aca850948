package server

import (
	"regexp"
	"slices"
	"strconv"
	"strings"

	"google.golang.org/genproto/googleapis/rpc/status"

	"github.com/meshlet/meshlet/xds"
)

// quoted matches a Go-quoted string (%q), escapes included.
var quoted = regexp.MustCompile(`"(?:[^"\\]|\\.)*"`)

// NACKResources returns the resources a NACK's error_detail blames, out of
// names, the resources of typeURL in the rejected snapshot.
//
// A NACK from meshlet's sidecar names them in its details
// (xds.ParseNACKDetails: one google.rpc.ErrorInfo per rejected resource);
// NACKResources then returns those of typeURL found in names, and never
// reads the message. Other clients (grpc-go's and other proxyless gRPC
// clients, Envoy, meshlet sidecars older than the details) send prose
// only; in the message NACKResources then looks, in order, for:
//  1. quoted names after the kind word of typeURL (xds.KindOf), the form
//     meshlet's sidecar writes (`route configuration "api": ...`,
//     `cluster "api": ...`; several errors may be joined in one message);
//  2. any quoted string equal to one of names (other xDS clients).
//
// Either way it returns the matches (in the order of names, without
// duplicates) and true. When the NACK names none of them it returns every
// name and false: the whole type is suspect.
func NACKResources(typeURL string, detail *status.Status, names []string) (blamed []string, named bool) {
	if ds := xds.ParseNACKDetails(detail); len(ds) > 0 {
		set := map[string]bool{}
		for _, d := range ds {
			if d.TypeURL == typeURL {
				set[d.Name] = true
			}
		}
		if out := pickNames(names, set); len(out) > 0 {
			return out, true
		}
		return slices.Clone(names), false
	}
	return proseResources(typeURL, detail.GetMessage(), names)
}

// proseResources is NACKResources for a NACK without meshlet's details.
func proseResources(typeURL, detail string, names []string) (blamed []string, named bool) {
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
		if kind := xds.KindOf(typeURL); kind != "" {
			rest, ok := strings.CutSuffix(before, string(kind))
			if ok && (rest == "" || !isWordByte(rest[len(rest)-1])) {
				kinded[name] = true
			}
		}
	}
	if len(kinded) > 0 {
		return pickNames(names, kinded), true
	}
	if len(loose) > 0 {
		return pickNames(names, loose), true
	}
	return slices.Clone(names), false
}

// pickNames returns the names in set, in the order of names, without
// duplicates.
func pickNames(names []string, set map[string]bool) []string {
	var out []string
	for _, n := range names {
		if set[n] && !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out
}

func isWordByte(b byte) bool {
	return b == '_' || b == '-' || ('a' <= b && b <= 'z') || ('A' <= b && b <= 'Z') || ('0' <= b && b <= '9')
}
