//! Multi-process replicas: workers that each run one stage of a model, grouped by the
//! coordinator (`relayfarm-coordinator --replica-layout text-encoder=1,denoiser=2,vae=1`).
//!
//! - [`ReplicaLayout`]: how many workers each stage takes (the denoiser's count is its
//!   tensor-parallel size).
//! - [`ReplicaPlanner`]: the pool of workers that offered themselves for replicas
//!   (`ReplicaService.JoinReplica`); as soon as enough unassigned live workers of a model are
//!   there, it forms a replica: stages in joining order (text encoder, denoiser ranks `0..N`,
//!   VAE), a fresh generation number. A member that stops heartbeating (lease) or leaves
//!   dissolves its replica: the others get an empty assignment on their next heartbeat and the
//!   head's in-flight jobs are released for redelivery (by the server, which owns the queue).
//!   The replica re-forms when enough workers are back.
//!
//! The planner is in memory: workers of one replica must talk to the same coordinator (a
//! restarted coordinator re-forms replicas from the workers' next heartbeats, which ask them
//! to join again).

use relayfarm_proto::v1::Assignment;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// A stage of a replica, as the layout and assignments name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StageName {
    /// `text-encoder`: claims jobs, encodes prompts, stores the results (the head).
    TextEncoder,
    /// `denoiser`: the denoising loop, possibly over several tensor-parallel ranks.
    Denoiser,
    /// `vae`: decodes latents and sends images back to the head.
    Vae,
}

impl StageName {
    /// Every stage, in pipeline order.
    pub const ALL: [StageName; 3] = [StageName::TextEncoder, StageName::Denoiser, StageName::Vae];

    /// The name used in layouts and assignments.
    pub fn as_str(self) -> &'static str {
        match self {
            StageName::TextEncoder => "text-encoder",
            StageName::Denoiser => "denoiser",
            StageName::Vae => "vae",
        }
    }

    /// Parses a stage name.
    pub fn parse(s: &str) -> Option<Self> {
        StageName::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl fmt::Display for StageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Workers per stage of one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaLayout {
    /// Text-encoder workers (1 for now).
    pub text_encoder: u32,
    /// Denoiser workers = tensor-parallel ranks.
    pub denoiser: u32,
    /// VAE workers (1 for now).
    pub vae: u32,
}

impl ReplicaLayout {
    /// Parses `text-encoder=1,denoiser=2,vae=1` (every stage named once, in any order).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut counts: BTreeMap<StageName, u32> = BTreeMap::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, n) = part.split_once('=').ok_or_else(|| {
                format!("replica layout: `{part}` is not STAGE=COUNT (e.g. `denoiser=2`)")
            })?;
            let name = name.trim();
            let stage = StageName::parse(name).ok_or_else(|| {
                format!(
                    "replica layout: unknown stage `{name}`; stages are text-encoder, denoiser, vae"
                )
            })?;
            let n: u32 = n.trim().parse().map_err(|_| {
                format!("replica layout: `{part}`: the count must be a whole number")
            })?;
            if n == 0 {
                return Err(format!(
                    "replica layout: `{part}`: every stage needs at least one worker"
                ));
            }
            if counts.insert(stage, n).is_some() {
                return Err(format!("replica layout: stage `{name}` named twice"));
            }
        }
        for st in StageName::ALL {
            if !counts.contains_key(&st) {
                return Err(format!(
                    "replica layout `{s}`: missing `{st}=N` (expected e.g. \
                     `text-encoder=1,denoiser=2,vae=1`)"
                ));
            }
        }
        let layout = ReplicaLayout {
            text_encoder: counts[&StageName::TextEncoder],
            denoiser: counts[&StageName::Denoiser],
            vae: counts[&StageName::Vae],
        };
        if layout.text_encoder != 1 {
            return Err(format!(
                "replica layout: text-encoder={}: only one text-encoder worker per replica is \
                 supported",
                layout.text_encoder
            ));
        }
        if layout.vae != 1 {
            return Err(format!(
                "replica layout: vae={}: only one VAE worker per replica is supported",
                layout.vae
            ));
        }
        if layout.denoiser > 64 {
            return Err(format!(
                "replica layout: denoiser={}: at most 64 tensor-parallel ranks",
                layout.denoiser
            ));
        }
        Ok(layout)
    }

    /// Workers one replica takes.
    pub fn size(&self) -> usize {
        (self.text_encoder + self.denoiser + self.vae) as usize
    }
}

impl fmt::Display for ReplicaLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "text-encoder={},denoiser={},vae={}",
            self.text_encoder, self.denoiser, self.vae
        )
    }
}

/// One worker offered for replicas.
#[derive(Debug, Clone)]
struct Member {
    model: String,
    link_addr: String,
    /// Joining order (stages are assigned in this order).
    seq: u64,
    last_seen_ms: u64,
    /// Jobs the worker reported running (the head's in-flight jobs).
    running: Vec<String>,
    replica: Option<String>,
}

/// A formed replica.
#[derive(Debug, Clone)]
struct Replica {
    generation: u64,
    model: String,
    /// Members in stage order: text encoder, denoiser ranks, VAE.
    members: Vec<(String, StageName, u32)>,
}

impl Replica {
    fn addr_of<'a>(
        &self,
        members: &'a BTreeMap<String, Member>,
        stage: StageName,
        rank: u32,
    ) -> &'a str {
        self.members
            .iter()
            .find(|(_, s, r)| *s == stage && *r == rank)
            .and_then(|(w, _, _)| members.get(w))
            .map(|m| m.link_addr.as_str())
            .unwrap_or("")
    }
}

/// A replica that fell apart: release `head_running` (held by `head`) when the head is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dissolved {
    /// The replica.
    pub replica_id: String,
    /// Its head (text-encoder) worker.
    pub head: String,
    /// Whether the head itself is gone (then the server releases its jobs; a live head
    /// releases them itself when it sees its assignment withdrawn).
    pub head_gone: bool,
    /// The head's in-flight jobs as it last reported them.
    pub head_running: Vec<String>,
    /// Why.
    pub reason: String,
}

/// Groups replica-member workers into replicas; see the module docs.
#[derive(Debug)]
pub struct ReplicaPlanner {
    layout: ReplicaLayout,
    lease_ms: u64,
    members: BTreeMap<String, Member>,
    replicas: BTreeMap<String, Replica>,
    next_seq: u64,
    generation: u64,
    rendezvous: HashMap<(String, u64, String), Vec<u8>>,
}

impl ReplicaPlanner {
    /// A planner for `layout`; members that do not heartbeat for `lease_ms` are dropped.
    pub fn new(layout: ReplicaLayout, lease_ms: u64) -> Self {
        ReplicaPlanner {
            layout,
            lease_ms,
            members: BTreeMap::new(),
            replicas: BTreeMap::new(),
            next_seq: 0,
            generation: 0,
            rendezvous: HashMap::new(),
        }
    }

    /// The layout.
    pub fn layout(&self) -> ReplicaLayout {
        self.layout
    }

    /// A worker offers itself for replicas of `model` (again: its link address is updated, and
    /// a replica it was in is dissolved if the address changed). Forms replicas when possible.
    pub fn join(
        &mut self,
        worker_id: &str,
        model: &str,
        link_addr: &str,
        now_ms: u64,
    ) -> Vec<Dissolved> {
        let mut dissolved = Vec::new();
        let changed = self
            .members
            .get(worker_id)
            .is_some_and(|m| m.model != model || m.link_addr != link_addr);
        if changed {
            dissolved.extend(self.remove(worker_id, "member re-joined with a new address"));
        }
        if let Some(m) = self.members.get_mut(worker_id) {
            m.last_seen_ms = now_ms;
        } else {
            self.next_seq += 1;
            self.members.insert(
                worker_id.to_string(),
                Member {
                    model: model.to_string(),
                    link_addr: link_addr.to_string(),
                    seq: self.next_seq,
                    last_seen_ms: now_ms,
                    running: Vec::new(),
                    replica: None,
                },
            );
        }
        self.form(model);
        dissolved
    }

    /// A member's heartbeat: its assignment (empty `stage` while unassigned), or `None` when
    /// the worker is not a member (it should join again).
    pub fn heartbeat(
        &mut self,
        worker_id: &str,
        running: &[String],
        now_ms: u64,
    ) -> Option<Assignment> {
        let model = {
            let m = self.members.get_mut(worker_id)?;
            m.last_seen_ms = now_ms;
            m.running = running.to_vec();
            m.model.clone()
        };
        self.form(&model);
        self.assignment(worker_id)
    }

    /// The current assignment of a member (`None`: not a member).
    pub fn assignment(&self, worker_id: &str) -> Option<Assignment> {
        let m = self.members.get(worker_id)?;
        let Some(rid) = &m.replica else {
            return Some(Assignment {
                model: m.model.clone(),
                ..Assignment::default()
            });
        };
        let Some(r) = self.replicas.get(rid) else {
            return Some(Assignment {
                model: m.model.clone(),
                ..Assignment::default()
            });
        };
        let (_, stage, rank) = r.members.iter().find(|(w, _, _)| w == worker_id)?;
        let head_addr = r.addr_of(&self.members, StageName::TextEncoder, 0);
        let downstream = match stage {
            StageName::TextEncoder => r.addr_of(&self.members, StageName::Denoiser, 0),
            StageName::Denoiser if *rank == 0 => r.addr_of(&self.members, StageName::Vae, 0),
            StageName::Denoiser => "",
            StageName::Vae => head_addr,
        };
        Some(Assignment {
            replica_id: rid.clone(),
            generation: r.generation,
            model: r.model.clone(),
            stage: stage.as_str().to_string(),
            tp_rank: *rank,
            tp_size: if *stage == StageName::Denoiser {
                self.layout.denoiser
            } else {
                1
            },
            downstream_addr: downstream.to_string(),
            head_addr: head_addr.to_string(),
            head_worker_id: r
                .members
                .iter()
                .find(|(_, s, rank)| *s == StageName::TextEncoder && *rank == 0)
                .map(|(w, _, _)| w.clone())
                .unwrap_or_default(),
        })
    }

    /// A worker leaves (deregisters): its replica is dissolved.
    pub fn leave(&mut self, worker_id: &str) -> Vec<Dissolved> {
        self.remove(worker_id, "a member deregistered")
    }

    /// Drops members whose lease has expired (dissolving their replicas) and forms replicas
    /// from whoever is left.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Dissolved> {
        let dead: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| now_ms.saturating_sub(m.last_seen_ms) > self.lease_ms)
            .map(|(w, _)| w.clone())
            .collect();
        let mut out = Vec::new();
        for w in dead {
            out.extend(self.remove(&w, "a member stopped heartbeating (lease expired)"));
        }
        let models: Vec<String> = self.members.values().map(|m| m.model.clone()).collect();
        for m in models {
            self.form(&m);
        }
        out
    }

    /// Posts a rendezvous value of a replica formation. Refused (false) for a formation that
    /// no longer exists.
    pub fn post(&mut self, replica_id: &str, generation: u64, key: &str, value: Vec<u8>) -> bool {
        if !self.is_current(replica_id, generation) {
            return false;
        }
        self.rendezvous
            .insert((replica_id.to_string(), generation, key.to_string()), value);
        true
    }

    /// A posted rendezvous value.
    pub fn lookup(&self, replica_id: &str, generation: u64, key: &str) -> Option<Vec<u8>> {
        self.rendezvous
            .get(&(replica_id.to_string(), generation, key.to_string()))
            .cloned()
    }

    /// Whether `replica_id` exists with this generation.
    pub fn is_current(&self, replica_id: &str, generation: u64) -> bool {
        self.replicas
            .get(replica_id)
            .is_some_and(|r| r.generation == generation)
    }

    /// Members and formed replicas (for logs and tests).
    pub fn counts(&self) -> (usize, usize) {
        (self.members.len(), self.replicas.len())
    }

    /// Removes a member, dissolving its replica.
    fn remove(&mut self, worker_id: &str, reason: &str) -> Vec<Dissolved> {
        let Some(m) = self.members.remove(worker_id) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if let Some(rid) = m.replica {
            if let Some(d) = self.dissolve(&rid, worker_id, &m.running, reason) {
                out.push(d);
            }
        }
        out
    }

    fn dissolve(
        &mut self,
        replica_id: &str,
        gone: &str,
        gone_running: &[String],
        reason: &str,
    ) -> Option<Dissolved> {
        let r = self.replicas.remove(replica_id)?;
        self.rendezvous.retain(|(rid, _, _), _| rid != replica_id);
        let head = r
            .members
            .iter()
            .find(|(_, s, _)| *s == StageName::TextEncoder)
            .map(|(w, _, _)| w.clone())
            .unwrap_or_default();
        for (w, _, _) in &r.members {
            if let Some(m) = self.members.get_mut(w) {
                m.replica = None;
            }
        }
        let head_gone = head == gone;
        let head_running = if head_gone {
            gone_running.to_vec()
        } else {
            self.members
                .get(&head)
                .map(|m| m.running.clone())
                .unwrap_or_default()
        };
        tracing::info!(replica = %replica_id, generation = r.generation, worker = %gone, reason, "replica dissolved");
        Some(Dissolved {
            replica_id: replica_id.to_string(),
            head,
            head_gone,
            head_running,
            reason: format!("{reason} ({gone})"),
        })
    }

    /// Forms as many replicas of `model` as the unassigned members allow.
    fn form(&mut self, model: &str) {
        loop {
            let mut free: Vec<(u64, String)> = self
                .members
                .iter()
                .filter(|(_, m)| m.model == model && m.replica.is_none())
                .map(|(w, m)| (m.seq, w.clone()))
                .collect();
            if free.len() < self.layout.size() {
                return;
            }
            free.sort();
            self.generation += 1;
            let generation = self.generation;
            let replica_id = format!("{model}/r{generation}");
            let mut slots = Vec::new();
            slots.push((StageName::TextEncoder, 0));
            slots.extend((0..self.layout.denoiser).map(|r| (StageName::Denoiser, r)));
            slots.push((StageName::Vae, 0));
            let members: Vec<(String, StageName, u32)> = free
                .into_iter()
                .zip(slots)
                .map(|((_, w), (s, r))| (w, s, r))
                .collect();
            for (w, _, _) in &members {
                if let Some(m) = self.members.get_mut(w) {
                    m.replica = Some(replica_id.clone());
                }
            }
            tracing::info!(
                replica = %replica_id,
                generation,
                members = ?members.iter().map(|(w, s, r)| format!("{w}={s}:{r}")).collect::<Vec<_>>(),
                "replica formed"
            );
            self.replicas.insert(
                replica_id,
                Replica {
                    generation,
                    model: model.to_string(),
                    members,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_parse_with_clear_errors() {
        let l = ReplicaLayout::parse("text-encoder=1,denoiser=2,vae=1").unwrap();
        assert_eq!((l.text_encoder, l.denoiser, l.vae), (1, 2, 1));
        assert_eq!(l.size(), 4);
        assert_eq!(l.to_string(), "text-encoder=1,denoiser=2,vae=1");
        assert_eq!(
            ReplicaLayout::parse(" vae=1, denoiser=1 ,text-encoder=1").unwrap(),
            ReplicaLayout {
                text_encoder: 1,
                denoiser: 1,
                vae: 1
            }
        );
        let err = |s: &str| ReplicaLayout::parse(s).unwrap_err();
        assert!(err("text-encoder=1,unet=2,vae=1").contains("unknown stage `unet`"));
        assert!(err("text-encoder=1,denoiser=0,vae=1").contains("at least one"));
        assert!(err("text-encoder=2,denoiser=1,vae=1").contains("only one text-encoder"));
        assert!(err("text-encoder=1,denoiser=1,vae=3").contains("only one VAE"));
        assert!(err("text-encoder=1,denoiser=1").contains("missing `vae=N`"));
        assert!(err("text-encoder=1,denoiser=x,vae=1").contains("whole number"));
        assert!(err("text-encoder,denoiser=1,vae=1").contains("STAGE=COUNT"));
        assert!(err("vae=1,vae=1,text-encoder=1,denoiser=1").contains("twice"));
    }

    fn planner() -> ReplicaPlanner {
        ReplicaPlanner::new(
            ReplicaLayout::parse("text-encoder=1,denoiser=2,vae=1").unwrap(),
            1000,
        )
    }

    #[test]
    fn replicas_form_in_joining_order_and_dissolve_on_expiry() {
        let mut p = planner();
        for (i, w) in ["te", "d0", "d1"].iter().enumerate() {
            assert!(p
                .join(w, "tiny", &format!("127.0.0.1:{}", 7000 + i), 0)
                .is_empty());
        }
        // Three of four: nobody assigned yet.
        let a = p.heartbeat("te", &[], 10).unwrap();
        assert_eq!(a.stage, "");
        assert_eq!(p.counts(), (3, 0));
        p.join("vae", "tiny", "127.0.0.1:7003", 20);
        assert_eq!(p.counts(), (4, 1));
        let te = p.heartbeat("te", &["j1".into()], 30).unwrap();
        let d0 = p.assignment("d0").unwrap();
        let d1 = p.assignment("d1").unwrap();
        let vae = p.assignment("vae").unwrap();
        assert_eq!(te.stage, "text-encoder");
        assert_eq!(te.downstream_addr, "127.0.0.1:7001");
        assert_eq!(
            (d0.stage.as_str(), d0.tp_rank, d0.tp_size),
            ("denoiser", 0, 2)
        );
        assert_eq!(d0.downstream_addr, "127.0.0.1:7003");
        assert_eq!((d1.stage.as_str(), d1.tp_rank), ("denoiser", 1));
        assert_eq!(vae.stage, "vae");
        assert_eq!(vae.downstream_addr, "127.0.0.1:7000");
        assert_eq!(vae.head_addr, "127.0.0.1:7000");
        assert!(te.replica_id == vae.replica_id && te.generation == vae.generation);
        // Rendezvous values belong to one formation.
        assert!(p.post(&d0.replica_id, d0.generation, "tp", b"addr".to_vec()));
        assert_eq!(
            p.lookup(&d1.replica_id, d1.generation, "tp").unwrap(),
            b"addr"
        );
        assert!(!p.post(&d0.replica_id, d0.generation + 1, "tp", vec![]));
        // The VAE stops heartbeating: the replica dissolves, the head is told, not released.
        for t in [500, 900, 1400] {
            let j1 = vec!["j1".to_string()];
            for w in ["te", "d0", "d1"] {
                p.heartbeat(w, if w == "te" { &j1 } else { &[] }, t);
            }
        }
        let d = p.expire(1500);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].head, "te");
        assert!(!d[0].head_gone);
        assert_eq!(d[0].head_running, vec!["j1".to_string()]);
        assert_eq!(p.heartbeat("te", &[], 1500).unwrap().stage, "");
        assert!(p.lookup(&d0.replica_id, d0.generation, "tp").is_none());
        assert!(p.heartbeat("vae", &[], 1500).is_none());
        // A new VAE worker: the replica re-forms, same stages for the survivors, new generation.
        p.join("vae2", "tiny", "127.0.0.1:7004", 1600);
        let te2 = p.assignment("te").unwrap();
        assert_eq!(te2.stage, "text-encoder");
        assert!(te2.generation > te.generation);
        assert_eq!(p.assignment("d1").unwrap().tp_rank, 1);
        assert_eq!(
            p.assignment("vae2").unwrap().downstream_addr,
            "127.0.0.1:7000"
        );
    }

    #[test]
    fn a_leaving_head_has_its_jobs_released_and_models_do_not_mix() {
        let mut p = ReplicaPlanner::new(
            ReplicaLayout::parse("text-encoder=1,denoiser=1,vae=1").unwrap(),
            1000,
        );
        p.join("a", "m1", "h:1", 0);
        p.join("b", "m2", "h:2", 0);
        p.join("c", "m1", "h:3", 0);
        assert_eq!(p.counts(), (3, 0));
        p.join("d", "m1", "h:4", 0);
        assert_eq!(p.counts(), (4, 1));
        assert_eq!(p.assignment("b").unwrap().stage, "");
        p.heartbeat("a", &["j7".into()], 10);
        let d = p.leave("a");
        assert_eq!(d.len(), 1);
        assert!(d[0].head_gone);
        assert_eq!(d[0].head_running, vec!["j7".to_string()]);
        assert_eq!(p.assignment("c").unwrap().stage, "");
        // Joining again with another address dissolves the old formation.
        p.join("a2", "m1", "h:5", 20);
        assert_eq!(p.counts().1, 1);
        let d = p.join("c", "m1", "h:9", 30);
        assert_eq!(d.len(), 1);
        assert_eq!(p.counts().1, 1, "re-formed at once with the new address");
    }
}
