package xds

import "time"

// DefaultConnectTimeout is the cluster connect timeout used when none is
// configured (Envoy's Cluster.connect_timeout default: 5 s).
const DefaultConnectTimeout = 5 * time.Second
