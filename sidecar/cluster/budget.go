package cluster

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshlet/meshlet/xds"
)

// RetryBudget bounds the retries sent to a cluster, as Finagle's and
// Linkerd's retry budgets do: every request deposits Ratio tokens, every
// retry withdraws one, deposits and withdrawals count for TTL, and a reserve
// of MinRetriesPerSecond × TTL tokens is always there. Deposit is a single
// atomic add on the request path; TryWithdraw (only on the retry path) sums
// the window.
type RetryBudget struct {
	ratio   float64
	reserve float64
	bucket  time.Duration // width of one bucket: TTL / len(buckets)
	now     func() time.Time

	buckets [budgetBuckets]budgetBucket
	mu      sync.Mutex // serialises bucket resets and withdrawals
}

const budgetBuckets = 10

type budgetBucket struct {
	epoch       atomic.Int64 // bucket number (time / width) this bucket counts
	deposits    atomic.Int64
	withdrawals atomic.Int64
}

// NewRetryBudget returns the budget described by b (defaults: 20%, 10 per
// second, 10 s when b is nil).
func NewRetryBudget(b *xds.RetryBudget) *RetryBudget {
	if b == nil {
		b = &xds.RetryBudget{Ratio: 0.2, MinRetriesPerSecond: 10, TTL: xds.Duration(10 * time.Second)}
	}
	ttl := time.Duration(b.TTL)
	return &RetryBudget{
		ratio:   b.Ratio,
		reserve: float64(b.MinRetriesPerSecond) * ttl.Seconds(),
		bucket:  max(ttl/budgetBuckets, time.Millisecond),
		now:     time.Now,
	}
}

func (r *RetryBudget) current() *budgetBucket {
	epoch := r.now().UnixNano() / int64(r.bucket)
	b := &r.buckets[epoch%budgetBuckets]
	if b.epoch.Load() != epoch {
		r.mu.Lock()
		if b.epoch.Load() != epoch {
			b.deposits.Store(0)
			b.withdrawals.Store(0)
			b.epoch.Store(epoch)
		}
		r.mu.Unlock()
	}
	return b
}

// Deposit records one request.
func (r *RetryBudget) Deposit() { r.current().deposits.Add(1) }

// TryWithdraw takes a token for one retry and reports whether the budget
// had one.
func (r *RetryBudget) TryWithdraw() bool {
	cur := r.current()
	r.mu.Lock()
	defer r.mu.Unlock()
	epoch := cur.epoch.Load()
	var deposits, withdrawals int64
	for i := range r.buckets {
		b := &r.buckets[i]
		if e := b.epoch.Load(); e > epoch-budgetBuckets && e <= epoch {
			deposits += b.deposits.Load()
			withdrawals += b.withdrawals.Load()
		}
	}
	if r.reserve+r.ratio*float64(deposits)-float64(withdrawals) < 1 {
		return false
	}
	cur.withdrawals.Add(1)
	return true
}
