//! [`Link`] between two GPUs over NCCL point-to-point send/recv (feature `nccl`).
//!
//! The two stage workers share a two-rank communicator (its unique id exchanged through the
//! coordinator's rendezvous). A message goes as: its header length (one u32), the JSON header
//! (names, shapes and dtypes of the tensors, padded into u32 words), then each tensor straight
//! from device memory. Tensors whose dtype NCCL's device path does not take (e.g. i64 masks)
//! travel as f32 and are cast back (exact for the small integers they hold).

use super::message::WireHeader;
use super::{Link, StageMessage};
use crate::parallel::NcclCollective;
use crate::{ModelError, Result};
use candle_core::{DType, Device, Tensor};
use std::str::FromStr;
use std::sync::Arc;

/// One end of an NCCL link; see the module docs.
pub struct NcclLink {
    comm: Arc<NcclCollective>,
    peer: usize,
    device: Device,
}

impl NcclLink {
    /// A link to rank `peer` of `comm`, with tensors on `device`.
    pub fn new(comm: Arc<NcclCollective>, peer: usize, device: Device) -> Self {
        NcclLink { comm, peer, device }
    }
}

fn wire_dtype(d: DType) -> DType {
    match d {
        DType::F32 | DType::F16 | DType::BF16 | DType::U32 => d,
        _ => DType::F32,
    }
}

fn bad(why: String) -> ModelError {
    ModelError::invalid("nccl link", why)
}

impl Link for NcclLink {
    fn send(&mut self, msg: StageMessage) -> Result<()> {
        let header = serde_json::to_vec(&WireHeader::describe(&msg))
            .map_err(|e| bad(format!("header: {e}")))?;
        let mut words = vec![0u32; header.len().div_ceil(4)];
        for (i, b) in header.iter().enumerate() {
            words[i / 4] |= u32::from(*b) << (8 * (i % 4));
        }
        let len = Tensor::new(&[header.len() as u32], &self.device)?;
        self.comm.send_to(&len, self.peer)?;
        let n = words.len();
        self.comm
            .send_to(&Tensor::from_vec(words, n, &self.device)?, self.peer)?;
        for (_, t) in &msg.tensors {
            let t = t
                .to_device(&self.device)?
                .to_dtype(wire_dtype(t.dtype()))?
                .contiguous()?;
            self.comm.send_to(&t, self.peer)?;
        }
        Ok(())
    }

    fn recv(&mut self) -> Result<Option<StageMessage>> {
        let len = Tensor::zeros(1, DType::U32, &self.device)?;
        let len = self.comm.recv_from(&len, self.peer)?.to_vec1::<u32>()?[0] as usize;
        let words = Tensor::zeros(len.div_ceil(4), DType::U32, &self.device)?;
        let words = self.comm.recv_from(&words, self.peer)?.to_vec1::<u32>()?;
        let bytes: Vec<u8> = (0..len)
            .map(|i| (words[i / 4] >> (8 * (i % 4))) as u8)
            .collect();
        let wire: WireHeader =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("header: {e}")))?;
        if wire.shapes.len() != wire.names.len() || wire.dtypes.len() != wire.names.len() {
            return Err(bad("header without tensor shapes".into()));
        }
        let mut tensors = Vec::with_capacity(wire.names.len());
        for ((name, shape), dtype) in wire.names.into_iter().zip(wire.shapes).zip(wire.dtypes) {
            let dtype = DType::from_str(&dtype).map_err(|e| bad(format!("{name}: {e}")))?;
            let like = Tensor::zeros(shape, wire_dtype(dtype), &self.device)?;
            let t = self.comm.recv_from(&like, self.peer)?.to_dtype(dtype)?;
            tensors.push((name, t));
        }
        Ok(Some(StageMessage {
            header: wire.header,
            tensors,
        }))
    }

    fn describe(&self) -> String {
        format!("nccl:rank{}→rank{}", self.comm.rank_id(), self.peer)
    }
}
