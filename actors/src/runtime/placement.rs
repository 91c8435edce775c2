//! Where each unit of the model lives under the runtime's budget at start (`--explain`):
//! resident on the device, streamed through the window, computed on the host (a GPU's host
//! layers), or an expert that loads when the router chooses it.

use crate::pipeline::plan::LoadPlan;
use crate::pipeline::scheduler::plan_fixed;
use std::collections::BTreeSet;
use std::fmt;

/// Where one unit lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Loaded once and kept (the fixed set).
    Resident,
    /// Loaded through the streaming window each time compute reaches it.
    Streamed,
    /// An expert outside the fixed set: loaded only when the router chooses it.
    Routed,
    /// Computed on the host from the mapped file (no device memory).
    Host,
}

/// What a unit holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitKind {
    Layer(usize),
    Expert {
        layer: usize,
        expert: usize,
    },
    /// Embeddings, output norm, and the head unless it streams.
    Global,
    /// A row chunk of the streamed output head.
    HeadChunk,
}

impl UnitKind {
    /// Units that print as one line when adjacent and placed alike: the layers, one layer's
    /// experts, the head's chunks.
    fn group(self) -> (u8, usize) {
        match self {
            Self::Layer(_) => (0, 0),
            Self::Expert { layer, .. } => (1, layer),
            Self::Global => (2, 0),
            Self::HeadChunk => (3, 0),
        }
    }
}

/// One unit's place and device bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedUnit {
    pub unit: usize,
    pub name: String,
    pub kind: UnitKind,
    pub bytes: u64,
    pub place: Place,
}

/// The placement at start, units in the order compute uses them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub budget_bytes: u64,
    /// Streaming window slots (0: everything resident).
    pub window: usize,
    pub units: Vec<PlacedUnit>,
}

impl Placement {
    /// The placement the Scheduler starts from for `plan` under `budget` with a window of
    /// `k` (before any hint moves it).
    pub fn of(plan: &LoadPlan, budget: u64, k: usize) -> Self {
        let bytes: Vec<u64> = plan.units.iter().map(|u| u.dev_bytes).collect();
        let fixed = plan_fixed(&bytes, plan.global(), &BTreeSet::new(), budget, k).ok();
        let units = plan
            .use_order()
            .into_iter()
            .map(|u| {
                let unit = &plan.units[u];
                let place = if plan.host_layers.contains(&u) {
                    Place::Host
                } else if fixed.as_ref().is_none_or(|f| f.fixed[u]) {
                    Place::Resident
                } else if unit.expert.is_some() {
                    Place::Routed
                } else {
                    Place::Streamed
                };
                let kind = match (unit.layer, unit.expert) {
                    (Some(layer), Some(expert)) => UnitKind::Expert { layer, expert },
                    (Some(l), None) => UnitKind::Layer(l),
                    (None, _) if u == plan.global() => UnitKind::Global,
                    (None, _) => UnitKind::HeadChunk,
                };
                PlacedUnit {
                    unit: u,
                    name: plan.unit_name(u),
                    kind,
                    bytes: unit.dev_bytes,
                    place,
                }
            })
            .collect();
        Self {
            budget_bytes: budget,
            window: fixed.map_or(0, |f| f.window),
            units,
        }
    }

    /// Device bytes of the units in `place`.
    pub fn bytes_in(&self, place: Place) -> u64 {
        self.units
            .iter()
            .filter(|u| u.place == place)
            .map(|u| u.bytes)
            .sum()
    }
}

/// Measured rates behind [`Placement::expected_decode`], in bytes per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    /// Weights the decode products get through (resident in the compute's memory).
    pub compute: f64,
    /// Bytes the reader brings in for the streamed units.
    pub stream: f64,
}

/// An expected decode rate and the per-token times it comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpectedDecode {
    pub tokens_per_s: f64,
    pub compute_ms: f64,
    pub stream_ms: f64,
}

impl Placement {
    /// Decode tokens per second expected at `r` for a compute that runs every unit from its own
    /// memory (the CPU backend): each token puts every resident and streamed unit's weights
    /// through the products and reads the streamed ones again; the pipeline overlaps the reads
    /// with the compute, so a token takes the longer of the two. Experts loaded when routed and
    /// layers on the host are left out (which experts run depends on the router; a host layer's
    /// weights are not in this placement's bytes).
    pub fn expected_decode(&self, r: Rates) -> ExpectedDecode {
        let weights = self.bytes_in(Place::Resident) + self.bytes_in(Place::Streamed);
        let secs = |bytes: u64, rate: f64| {
            if bytes == 0 {
                0.0
            } else if rate > 0.0 {
                bytes as f64 / rate
            } else {
                f64::INFINITY
            }
        };
        let compute = secs(weights, r.compute);
        let stream = secs(self.bytes_in(Place::Streamed), r.stream);
        let token = compute.max(stream);
        ExpectedDecode {
            tokens_per_s: if token > 0.0 { 1.0 / token } else { 0.0 },
            compute_ms: compute * 1e3,
            stream_ms: stream * 1e3,
        }
    }
}

/// Bytes in the unit that reads best (GB, MB, KB).
fn human(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.1} KB", b / 1e3)
    }
}

impl fmt::Display for Placement {
    /// A line per run of consecutive units of one kind and place, then the totals.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "placement: budget {}, streaming window {} slot(s)",
            human(self.budget_bytes),
            self.window
        )?;
        let runs = self
            .units
            .chunk_by(|a, b| a.place == b.place && a.kind.group() == b.kind.group());
        for run in runs {
            let bytes: u64 = run.iter().map(|u| u.bytes).sum();
            let what = match (run, run[0].kind) {
                ([one], _) => one.name.clone(),
                ([a, .., b], UnitKind::Layer(first)) => match b.kind {
                    UnitKind::Layer(last) => format!("layers {first}-{last}"),
                    _ => a.name.clone(),
                },
                (_, UnitKind::Expert { layer, .. }) => {
                    format!("layer {layer} experts ({} units)", run.len())
                }
                _ => format!("head chunks ({} units)", run.len()),
            };
            let place = match run[0].place {
                Place::Resident => "resident",
                Place::Streamed => "streamed each token",
                Place::Routed => "loaded when routed",
                Place::Host => "computed on the host",
            };
            writeln!(f, "  {what}: {place}, {}", human(bytes))?;
        }
        write!(
            f,
            "resident {}, streamed per token {}, experts loaded when routed {}, layers on the host {}",
            human(self.bytes_in(Place::Resident)),
            human(self.bytes_in(Place::Streamed)),
            human(self.bytes_in(Place::Routed)),
            self.units.iter().filter(|u| u.place == Place::Host).count()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::backend::CpuBackend;
    use rocmforge::gguf::GgufFile;

    fn plan(family: &str) -> LoadPlan {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/data/tiny-families")
            .join(format!("{family}.q8_0.gguf"));
        let file = GgufFile::open(path).expect("tiny model");
        LoadPlan::new(&file, &CpuBackend::new()).expect("plan")
    }

    #[test]
    fn the_expected_rate_is_the_slower_of_compute_and_streaming() {
        let p = plan("llama");
        let total = p.total_dev_bytes();
        let whole = Placement::of(&p, total, 2);
        let r = Rates {
            compute: total as f64 * 100.0,
            stream: 1.0,
        };
        // Everything resident: compute only, 100 tokens/s.
        let e = whole.expected_decode(r);
        assert_eq!(e.stream_ms, 0.0);
        assert!((e.tokens_per_s - 100.0).abs() < 1e-9, "{e:?}");
        // A budget that streams: the slow reader decides.
        let part = Placement::of(&p, total / 2 + total / 4, 2);
        let streamed = part.bytes_in(Place::Streamed) as f64;
        let e = part.expected_decode(Rates {
            stream: streamed * 10.0,
            ..r
        });
        assert!((e.tokens_per_s - 10.0).abs() < 1e-9, "{e:?}");
        assert!(e.compute_ms < e.stream_ms);
    }

    #[test]
    fn every_unit_is_placed_once_and_the_bytes_add_up() {
        let p = plan("llama");
        let total = p.total_dev_bytes();
        let whole = Placement::of(&p, total, 2);
        assert!(whole.units.iter().all(|u| u.place == Place::Resident));
        assert_eq!(whole.bytes_in(Place::Resident), total);
        assert_eq!(whole.window, 0);
        // Three quarters of the weights: the global unit stays, some layers stream through the
        // window (at most the two slots asked for).
        let half = Placement::of(&p, total / 2 + total / 4, 2);
        assert_eq!(half.units.len(), p.units.len());
        assert_eq!(
            half.bytes_in(Place::Resident) + half.bytes_in(Place::Streamed),
            total
        );
        assert!(half.bytes_in(Place::Streamed) > 0);
        assert!((1..=2).contains(&half.window), "{half:?}");
        let text = half.to_string();
        assert!(text.contains("streamed each token"), "{text}");
        assert!(text.contains("global: resident"), "{text}");
        // Host layers: their units are computed on the host and cost nothing.
        let n = p.n_layers;
        let host = Placement::of(&p.place_on_host(n - 1..n), total / 2 + total / 4, 2);
        let on_host: Vec<&PlacedUnit> = host
            .units
            .iter()
            .filter(|u| u.place == Place::Host)
            .collect();
        assert_eq!(on_host.len(), 1);
        assert_eq!((on_host[0].unit, on_host[0].bytes), (n - 1, 0));
        assert!(host.to_string().contains("computed on the host"));
    }
}
