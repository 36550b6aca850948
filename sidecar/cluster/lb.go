package cluster

import (
	"math/rand/v2"
	"slices"
	"strconv"

	"github.com/cespare/xxhash/v2"

	"github.com/meshlet/meshlet/sidecar/config"
)

// endpointSet is one immutable generation of a cluster's endpoints with the
// structures its load balancer needs.
type endpointSet struct {
	list []*Endpoint
	// schedule is a smooth weighted round-robin sequence of indexes into
	// list (nil when all weights are equal: plain rotation).
	schedule []int
	// ring is the ring-hash ring, sorted by hash (ring hash only).
	ring []ringEntry
}

type ringEntry struct {
	hash uint64
	idx  int
}

// maxSchedule bounds the weighted round-robin sequence; weights are scaled
// down to fit.
const maxSchedule = 4096

func newEndpointSet(list []*Endpoint, cfg *config.Cluster) *endpointSet {
	s := &endpointSet{list: list}
	if len(list) == 0 {
		return s
	}
	weights := make([]int, len(list))
	total, equal := 0, true
	for i, e := range list {
		weights[i] = max(int(e.Weight()), 1)
		total += weights[i]
		if weights[i] != weights[0] {
			equal = false
		}
	}
	if !equal {
		if total > maxSchedule {
			for i := range weights {
				weights[i] = max(weights[i]*maxSchedule/total, 1)
			}
		}
		s.schedule = smoothWRR(weights)
	}
	if cfg.LB == config.LBRingHash {
		s.ring = buildRing(list, weights, max(cfg.RingSize/4, 64))
	}
	return s
}

// smoothWRR returns nginx's smooth weighted round-robin order for one
// cycle: each index appears weight times, spread out.
func smoothWRR(weights []int) []int {
	total := 0
	for _, w := range weights {
		total += w
	}
	current := make([]int, len(weights))
	out := make([]int, 0, total)
	for range total {
		best := 0
		for i, w := range weights {
			current[i] += w
			if current[i] > current[best] {
				best = i
			}
		}
		current[best] -= total
		out = append(out, best)
	}
	return out
}

// buildRing places each endpoint on the ring perWeight times per unit of
// its weight (weights relative to the smallest, capped at 64), hashing
// "address_n" with xxHash (Envoy's default ring hash function). The count
// does not depend on how many endpoints there are, so adding or removing one
// only moves the keys that land on it.
func buildRing(list []*Endpoint, weights []int, perWeight int) []ringEntry {
	least := weights[0]
	for _, w := range weights {
		least = min(least, w)
	}
	ring := make([]ringEntry, 0, perWeight*len(list))
	for i, e := range list {
		n := perWeight * min(max(weights[i]/least, 1), 64)
		for j := range n {
			ring = append(ring, ringEntry{hash: xxhash.Sum64String(e.Address + "_" + strconv.Itoa(j)), idx: i})
		}
	}
	slices.SortFunc(ring, func(a, b ringEntry) int {
		switch {
		case a.hash < b.hash:
			return -1
		case a.hash > b.hash:
			return 1
		}
		return a.idx - b.idx
	})
	return ring
}

// HashKey hashes a request header value for ring-hash selection.
func HashKey(v string) uint64 { return xxhash.Sum64String(v) }

// pick chooses an endpoint of s by the cluster's algorithm among those ok
// accepts, or nil. rr is the cluster's rotation counter.
func (s *endpointSet) pick(cfg *config.Cluster, rr *uint64Counter, key uint64, hasKey bool, ok func(*Endpoint) bool) *Endpoint {
	n := len(s.list)
	if n == 0 {
		return nil
	}
	switch {
	case cfg.LB == config.LBRingHash && hasKey && len(s.ring) > 0:
		i, _ := slices.BinarySearchFunc(s.ring, key, func(e ringEntry, k uint64) int {
			switch {
			case e.hash < k:
				return -1
			case e.hash > k:
				return 1
			}
			return 0
		})
		for j := range len(s.ring) {
			e := s.list[s.ring[(i+j)%len(s.ring)].idx]
			if ok(e) {
				return e
			}
			if j >= n*4 && j > 64 {
				break // the ring is mostly unavailable: fall back to a scan
			}
		}
	case cfg.LB == config.LBLeastRequest && n > 1:
		// Power of k choices; the first two are distinct endpoints, so with
		// two endpoints the less loaded one always wins.
		var best *Endpoint
		first := rand.IntN(n)
		for c := range max(cfg.ChoiceCount, 2) {
			i := rand.IntN(n)
			switch c {
			case 0:
				i = first
			case 1:
				if i = rand.IntN(n - 1); i >= first {
					i++
				}
			}
			e := s.list[i]
			if !ok(e) {
				continue
			}
			if best == nil || e.lessLoaded(best) {
				best = e
			}
		}
		if best != nil {
			return best
		}
	default:
		start := rr.next()
		if s.schedule != nil {
			for j := range len(s.schedule) {
				if e := s.list[s.schedule[(start+uint64(j))%uint64(len(s.schedule))]]; ok(e) {
					return e
				}
			}
			return nil
		}
		for j := range n {
			if e := s.list[(start+uint64(j))%uint64(n)]; ok(e) {
				return e
			}
		}
		return nil
	}
	// Fallback scan from a random start (ring without key, or random
	// choices that all failed).
	start := rand.IntN(n)
	for j := range n {
		if e := s.list[(start+j)%n]; ok(e) {
			return e
		}
	}
	return nil
}
