//! The typed message that travels between stage executors, and its wire encoding.
//!
//! A [`StageMessage`] is a small JSON header ([`MessageHeader`]: job id, what the message is,
//! the request's scalar parameters, the size plan, step info) plus named tensors. On the wire
//! it is `b"RFSM"`, the header length (u32 little-endian), the header JSON, then the tensors as
//! a safetensors blob (which records each tensor's dtype and shape).

use crate::pipeline::{Conditioning, GenerateRequest, SizePlan};
use crate::{ModelError, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 4] = b"RFSM";

/// What a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    /// text encoder → denoiser: the conditioning tensors and the initial noise.
    Conditioning,
    /// denoiser → VAE: the final latents.
    Latents,
    /// VAE → sink: the decoded image (f32 `[1, 3, H, W]` in `[0, 1]`) and the final latents.
    Image,
    /// Any stage → sink: the job failed (or was cancelled) in a stage; `error` says why.
    Failed,
    /// No more jobs: each stage forwards it downstream and stops.
    Shutdown,
}

/// The scalar parameters of a request (everything but tensors), as a header carries them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestHeader {
    /// Prompt.
    pub prompt: String,
    /// Negative prompt (`None`: the model's default).
    pub negative_prompt: Option<String>,
    /// Requested height.
    pub height: Option<u32>,
    /// Requested width.
    pub width: Option<u32>,
    /// Steps.
    pub steps: usize,
    /// Guidance scale.
    pub guidance: f64,
    /// Seed.
    pub seed: u64,
    /// Resolution binning.
    pub resolution_binning: bool,
    /// Size limits enforced.
    pub size_check: bool,
}

impl RequestHeader {
    /// The header of a request (its `latents` tensor, if any, travels as a tensor).
    pub fn of(req: &GenerateRequest) -> Self {
        RequestHeader {
            prompt: req.prompt.clone(),
            negative_prompt: req.negative_prompt.clone(),
            height: req.height,
            width: req.width,
            steps: req.steps,
            guidance: req.guidance,
            seed: req.seed,
            resolution_binning: req.resolution_binning,
            size_check: req.size_check,
        }
    }

    /// Back to a request (without `latents`).
    pub fn to_request(&self) -> GenerateRequest {
        GenerateRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            height: self.height,
            width: self.width,
            steps: self.steps,
            guidance: self.guidance,
            seed: self.seed,
            latents: None,
            resolution_binning: self.resolution_binning,
            size_check: self.size_check,
        }
    }
}

/// The size plan as a header carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanHeader {
    /// Output height.
    pub height: usize,
    /// Output width.
    pub width: usize,
    /// Generation height.
    pub gen_height: usize,
    /// Generation width.
    pub gen_width: usize,
}

impl From<SizePlan> for PlanHeader {
    fn from(p: SizePlan) -> Self {
        PlanHeader {
            height: p.height,
            width: p.width,
            gen_height: p.gen_height,
            gen_width: p.gen_width,
        }
    }
}

impl From<PlanHeader> for SizePlan {
    fn from(p: PlanHeader) -> Self {
        SizePlan {
            height: p.height,
            width: p.width,
            gen_height: p.gen_height,
            gen_width: p.gen_width,
        }
    }
}

/// The header of a [`StageMessage`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageHeader {
    /// The job this message belongs to.
    pub job_id: String,
    /// What the message carries.
    pub kind: MessageKind,
    /// The request (absent only for `Shutdown`).
    pub request: Option<RequestHeader>,
    /// The size plan (absent only for `Shutdown`).
    pub plan: Option<PlanHeader>,
    /// Whether the conditioning holds an unconditional half (classifier-free guidance).
    pub cfg: bool,
    /// Denoising steps done so far.
    pub steps_done: usize,
    /// Why the job failed (`Failed`).
    pub error: Option<String>,
    /// Whether the failure is a cancellation.
    pub cancelled: bool,
}

/// The header on the wire: the message header and the tensors' names in order (plus their
/// shapes and dtypes for links that send tensors one by one, like NCCL's).
#[derive(Serialize, Deserialize)]
pub(crate) struct WireHeader {
    pub(crate) header: MessageHeader,
    pub(crate) names: Vec<String>,
    #[serde(default)]
    pub(crate) shapes: Vec<Vec<usize>>,
    #[serde(default)]
    pub(crate) dtypes: Vec<String>,
}

impl WireHeader {
    /// The wire header of a message, with every tensor's shape and dtype.
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub(crate) fn describe(msg: &StageMessage) -> Self {
        WireHeader {
            header: msg.header.clone(),
            names: msg.tensors.iter().map(|(n, _)| n.clone()).collect(),
            shapes: msg.tensors.iter().map(|(_, t)| t.dims().to_vec()).collect(),
            dtypes: msg
                .tensors
                .iter()
                .map(|(_, t)| t.dtype().as_str().to_string())
                .collect(),
        }
    }
}

/// A message between stages; see the module docs.
#[derive(Debug, Clone)]
pub struct StageMessage {
    /// The header.
    pub header: MessageHeader,
    /// Named tensors, in a stable order.
    pub tensors: Vec<(String, Tensor)>,
}

/// The tensor name of the initial noise in a `Conditioning` message.
pub const NOISE: &str = "noise";
/// The tensor name of the final latents in `Latents` and `Image` messages.
pub const LATENTS: &str = "latents";
/// The tensor name of the decoded image in an `Image` message.
pub const IMAGE: &str = "image";

impl StageMessage {
    fn base(job_id: &str, kind: MessageKind, req: &GenerateRequest, plan: &SizePlan) -> Self {
        StageMessage {
            header: MessageHeader {
                job_id: job_id.to_string(),
                kind,
                request: Some(RequestHeader::of(req)),
                plan: Some((*plan).into()),
                cfg: false,
                steps_done: 0,
                error: None,
                cancelled: false,
            },
            tensors: Vec::new(),
        }
    }

    /// text encoder → denoiser.
    pub fn conditioning(
        job_id: &str,
        req: &GenerateRequest,
        plan: &SizePlan,
        cond: Conditioning,
        noise: Tensor,
    ) -> Self {
        let mut m = Self::base(job_id, MessageKind::Conditioning, req, plan);
        m.header.cfg = cond.cfg;
        m.tensors = cond.tensors;
        m.tensors.push((NOISE.to_string(), noise));
        m
    }

    /// denoiser → VAE.
    pub fn latents(job_id: &str, req: &GenerateRequest, plan: &SizePlan, latents: Tensor) -> Self {
        let mut m = Self::base(job_id, MessageKind::Latents, req, plan);
        m.header.steps_done = req.steps;
        m.tensors.push((LATENTS.to_string(), latents));
        m
    }

    /// VAE → sink.
    pub fn image(
        job_id: &str,
        req: &GenerateRequest,
        plan: &SizePlan,
        image: Tensor,
        latents: Tensor,
    ) -> Self {
        let mut m = Self::base(job_id, MessageKind::Image, req, plan);
        m.header.steps_done = req.steps;
        m.tensors.push((IMAGE.to_string(), image));
        m.tensors.push((LATENTS.to_string(), latents));
        m
    }

    /// A failure notice for `job_id`, forwarded to the sink by every later stage.
    pub fn failed(job_id: &str, request: Option<RequestHeader>, error: &ModelError) -> Self {
        StageMessage {
            header: MessageHeader {
                job_id: job_id.to_string(),
                kind: MessageKind::Failed,
                request,
                plan: None,
                cfg: false,
                steps_done: 0,
                error: Some(error.to_string()),
                cancelled: matches!(error, ModelError::Cancelled { .. }),
            },
            tensors: Vec::new(),
        }
    }

    /// The end of the stream.
    pub fn shutdown() -> Self {
        StageMessage {
            header: MessageHeader {
                job_id: String::new(),
                kind: MessageKind::Shutdown,
                request: None,
                plan: None,
                cfg: false,
                steps_done: 0,
                error: None,
                cancelled: false,
            },
            tensors: Vec::new(),
        }
    }

    /// The message kind.
    pub fn kind(&self) -> MessageKind {
        self.header.kind
    }

    /// The request it carries, or an error naming the message.
    pub fn request(&self) -> Result<GenerateRequest> {
        self.header
            .request
            .as_ref()
            .map(RequestHeader::to_request)
            .ok_or_else(|| self.malformed("has no request header"))
    }

    /// The size plan it carries.
    pub fn plan(&self) -> Result<SizePlan> {
        self.header
            .plan
            .map(SizePlan::from)
            .ok_or_else(|| self.malformed("has no size plan"))
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| self.malformed(&format!("has no tensor `{name}`")))
    }

    /// The conditioning of a `Conditioning` message (every tensor but the noise).
    pub fn to_conditioning(&self) -> Conditioning {
        Conditioning {
            cfg: self.header.cfg,
            tensors: self
                .tensors
                .iter()
                .filter(|(n, _)| n != NOISE)
                .cloned()
                .collect(),
        }
    }

    fn malformed(&self, what: &str) -> ModelError {
        ModelError::invalid(
            "stage message",
            format!(
                "{:?} message for job `{}` {what}",
                self.header.kind, self.header.job_id
            ),
        )
    }

    /// Bytes of tensor data.
    pub fn nbytes(&self) -> usize {
        self.tensors
            .iter()
            .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// The wire encoding (see the module docs). Tensors are copied to the host.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let wire = WireHeader {
            header: self.header.clone(),
            names: self.tensors.iter().map(|(n, _)| n.clone()).collect(),
            shapes: Vec::new(),
            dtypes: Vec::new(),
        };
        let header = serde_json::to_vec(&wire)
            .map_err(|e| ModelError::invalid("stage message", format!("header: {e}")))?;
        let host: Vec<(String, Tensor)> = self
            .tensors
            .iter()
            .map(|(n, t)| Ok((n.clone(), t.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        let blob = safetensors::serialize(host.iter().map(|(n, t)| (n.as_str(), t)), None)
            .map_err(|e| ModelError::invalid("stage message", format!("tensors: {e}")))?;
        let mut out = Vec::with_capacity(8 + header.len() + blob.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&blob);
        Ok(out)
    }

    /// Decodes [`StageMessage::encode`]'s bytes, putting the tensors on `device`.
    pub fn decode(bytes: &[u8], device: &Device) -> Result<Self> {
        let bad = |why: String| ModelError::invalid("stage message", why);
        if bytes.len() < 8 || &bytes[..4] != MAGIC {
            return Err(bad(
                "not a relayfarm stage message (bad magic): is the peer a relayfarm worker of the same version?".into(),
            ));
        }
        let hlen = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
        let Some(header) = bytes.get(8..8 + hlen) else {
            return Err(bad(format!(
                "truncated: header of {hlen} bytes in a {}-byte message",
                bytes.len()
            )));
        };
        let wire: WireHeader =
            serde_json::from_slice(header).map_err(|e| bad(format!("header: {e}")))?;
        let blob = &bytes[8 + hlen..];
        let st = safetensors::SafeTensors::deserialize(blob)
            .map_err(|e| bad(format!("tensors: {e}")))?;
        // safetensors orders tensors its own way: restore the sender's order from the header.
        let mut tensors = Vec::with_capacity(wire.names.len());
        for name in wire.names {
            let view = st
                .tensor(&name)
                .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
            let t = candle_core::safetensors::Load::load(&view, device)?;
            tensors.push((name, t));
        }
        Ok(StageMessage {
            header: wire.header,
            tensors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn round_trip_keeps_header_tensors_and_order() {
        let dev = Device::Cpu;
        let req = GenerateRequest::new("a cat", 3, 4.5);
        let plan = SizePlan {
            height: 32,
            width: 48,
            gen_height: 32,
            gen_width: 48,
        };
        let cond = Conditioning::new(true)
            .with(
                "prompt_embeds",
                Tensor::arange(0f32, 24., &dev)
                    .unwrap()
                    .reshape((2, 3, 4))
                    .unwrap(),
            )
            .with(
                "prompt_attention_mask",
                Tensor::ones((2, 3), DType::I64, &dev).unwrap(),
            );
        let noise = Tensor::ones((1, 4, 4, 6), DType::F32, &dev).unwrap();
        let m = StageMessage::conditioning("job-1", &req, &plan, cond, noise);
        let bytes = m.encode().unwrap();
        let back = StageMessage::decode(&bytes, &dev).unwrap();
        assert_eq!(back.header, m.header);
        let names: Vec<&str> = back.tensors.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["prompt_embeds", "prompt_attention_mask", "noise"]);
        assert_eq!(back.plan().unwrap(), plan);
        assert_eq!(back.request().unwrap().prompt, "a cat");
        let e = back
            .tensor("prompt_embeds")
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        assert_eq!(e[1][2][3], 23.0);
        assert!(back.to_conditioning().get(NOISE).is_err());
        assert!(StageMessage::decode(b"nope", &dev).is_err());
        assert!(StageMessage::decode(&bytes[..20], &dev).is_err());
    }
}
