//! Prometheus metrics at `/metrics`: VMs by state, tool calls by tool and
//! outcome, and call latency. Guest tools are counted as `guest:<tool>`
//! (not per VM), and names no one serves as `unknown`, so the number of
//! series stays bounded whatever clients send.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    tool: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ToolLabel {
    tool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

/// How a tool call ended.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Ok,
    /// A tool error (`isError`): the caller's input or the VM's state.
    ToolError,
    /// A JSON-RPC error: malformed arguments, unknown tool.
    ProtocolError,
}

pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    latency: Family<ToolLabel, Histogram>,
    vms: Family<StateLabel, Gauge>,
    pool: Family<KindLabel, Gauge>,
    decisions: Family<DecisionLabel, Counter>,
    decision_time: Histogram,
    egress: Family<EgressLabels, Counter>,
    egress_bytes: Family<EgressBytesLabels, Counter>,
    warm: Family<WarmLabels, Gauge>,
    warm_claims: Family<OutcomeLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WarmLabels {
    image: String,
    shape: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

/// One warm pool as `/metrics` shows it.
pub struct WarmGauge {
    pub image: String,
    /// `<vcpus>cpu-<memory>mib-<workspace>gib`.
    pub shape: String,
    pub size: u32,
    pub ready: u32,
    pub booting: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EgressLabels {
    vm: String,
    decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EgressBytesLabels {
    vm: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabel {
    decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("nexus");
        let calls = Family::<CallLabels, Counter>::default();
        let latency = Family::<ToolLabel, Histogram>::new_with_constructor(|| {
            // 100 us to ~26 s.
            Histogram::new(exponential_buckets(0.0001, 2.0, 19))
        });
        let vms = Family::<StateLabel, Gauge>::default();
        registry.register(
            "tool_calls",
            "Tool calls by tool and outcome",
            calls.clone(),
        );
        registry.register(
            "tool_call_duration_seconds",
            "Tool call latency",
            latency.clone(),
        );
        registry.register("vms", "VMs by state", vms.clone());
        let pool = Family::<KindLabel, Gauge>::default();
        registry.register(
            "pool_bytes",
            "Storage pool size and free space",
            pool.clone(),
        );
        let decisions = Family::<DecisionLabel, Counter>::default();
        registry.register(
            "policy_decisions",
            "Calls allowed and denied by the policy",
            decisions.clone(),
        );
        // 250 ns to ~1 ms.
        let decision_time = Histogram::new(exponential_buckets(2.5e-7, 2.0, 13));
        registry.register(
            "policy_decision_duration_seconds",
            "Time to read a call into an action and decide it",
            decision_time.clone(),
        );
        let egress = Family::<EgressLabels, Counter>::default();
        registry.register(
            "egress_connections",
            "Egress connections and requests by VM and decision (allow, deny, error)",
            egress.clone(),
        );
        let egress_bytes = Family::<EgressBytesLabels, Counter>::default();
        registry.register(
            "egress_bytes",
            "Egress bytes by VM and direction (up: to the upstream)",
            egress_bytes.clone(),
        );
        let warm = Family::<WarmLabels, Gauge>::default();
        registry.register(
            "warm_pool_vms",
            "Warm pools: spare VMs ready and booting, and the size kept (target), by image and shape",
            warm.clone(),
        );
        let warm_claims = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "warm_pool_claims",
            "VMs made by spawn_vm and fork_vm: taken from a warm pool (hit) or booted because none was ready (miss)",
            warm_claims.clone(),
        );
        Arc::new(Self {
            warm,
            warm_claims,
            registry,
            calls,
            latency,
            vms,
            pool,
            decisions,
            decision_time,
            egress,
            egress_bytes,
        })
    }

    /// Counts a call under `label`: a management tool's name,
    /// `guest:<tool>` or `unknown` (the caller decides; see `tools`).
    pub fn record_call(&self, label: &str, outcome: Outcome, took: Duration) {
        let tool = label.to_owned();
        let outcome = match outcome {
            Outcome::Ok => "ok",
            Outcome::ToolError => "tool_error",
            Outcome::ProtocolError => "protocol_error",
        };
        self.calls
            .get_or_create(&CallLabels {
                tool: tool.clone(),
                outcome: outcome.to_owned(),
            })
            .inc();
        self.latency
            .get_or_create(&ToolLabel { tool })
            .observe(took.as_secs_f64());
    }

    /// Counts one egress connection of VM `vm` (VMs are few and named by
    /// admins and owners, so the series stay bounded).
    pub fn record_egress(&self, vm: &str, decision: &str, up: u64, down: u64) {
        self.egress
            .get_or_create(&EgressLabels {
                vm: vm.to_owned(),
                decision: decision.to_owned(),
            })
            .inc();
        for (direction, bytes) in [("up", up), ("down", down)] {
            self.egress_bytes
                .get_or_create(&EgressBytesLabels {
                    vm: vm.to_owned(),
                    direction: direction.to_owned(),
                })
                .inc_by(bytes);
        }
    }

    /// Counts one policy decision and what it took.
    pub fn record_decision(&self, allowed: bool, took: Duration) {
        self.decisions
            .get_or_create(&DecisionLabel {
                decision: if allowed { "allow" } else { "deny" }.to_owned(),
            })
            .inc();
        self.decision_time.observe(took.as_secs_f64());
    }

    /// Counts a VM made of a pooled shape: taken from its pool, or not.
    pub fn record_warm_claim(&self, hit: bool) {
        self.warm_claims
            .get_or_create(&OutcomeLabel {
                outcome: if hit { "hit" } else { "miss" }.to_owned(),
            })
            .inc();
    }

    /// The text exposition, with the VM counts, pool space and warm
    /// pools as they are now.
    pub fn render(
        &self,
        running: usize,
        stopped: usize,
        pool: (u64, u64),
        warm: &[WarmGauge],
    ) -> String {
        for w in warm {
            for (state, n) in [
                ("ready", w.ready),
                ("booting", u32::from(w.booting)),
                ("target", w.size),
            ] {
                self.warm
                    .get_or_create(&WarmLabels {
                        image: w.image.clone(),
                        shape: w.shape.clone(),
                        state: state.to_owned(),
                    })
                    .set(i64::from(n));
            }
        }
        for (kind, bytes) in [("total", pool.0), ("free", pool.1)] {
            self.pool
                .get_or_create(&KindLabel {
                    kind: kind.to_owned(),
                })
                .set(bytes as i64);
        }
        for (state, n) in [("running", running), ("stopped", stopped)] {
            self.vms
                .get_or_create(&StateLabel {
                    state: state.to_owned(),
                })
                .set(n as i64);
        }
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
