//! [`Link`] over bounded channels between threads of one process.

use super::{Link, StageMessage};
use crate::{ModelError, Result};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

/// One end of an in-process connection; see [`InProcessLink::pair`].
pub struct InProcessLink {
    tx: Option<SyncSender<StageMessage>>,
    rx: Option<Receiver<StageMessage>>,
    name: String,
}

impl InProcessLink {
    /// A one-way connection holding at most `capacity` messages in flight: the first end
    /// sends, the second receives.
    pub fn pair(name: &str, capacity: usize) -> (InProcessLink, InProcessLink) {
        let (tx, rx) = sync_channel(capacity.max(1));
        (
            InProcessLink {
                tx: Some(tx),
                rx: None,
                name: name.to_string(),
            },
            InProcessLink {
                tx: None,
                rx: Some(rx),
                name: name.to_string(),
            },
        )
    }
}

impl Link for InProcessLink {
    fn send(&mut self, msg: StageMessage) -> Result<()> {
        let tx = self.tx.as_ref().ok_or_else(|| {
            ModelError::invalid("link", format!("{}: this end only receives", self.name))
        })?;
        tx.send(msg).map_err(|_| {
            ModelError::invalid(
                "link",
                format!("{}: the receiving stage has stopped", self.name),
            )
        })
    }

    fn recv(&mut self) -> Result<Option<StageMessage>> {
        let rx = self.rx.as_ref().ok_or_else(|| {
            ModelError::invalid("link", format!("{}: this end only sends", self.name))
        })?;
        Ok(rx.recv().ok())
    }

    fn describe(&self) -> String {
        format!("in-process:{}", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_flow_one_way_and_hang_up_is_seen() {
        let (mut tx, mut rx) = InProcessLink::pair("t", 2);
        tx.send(StageMessage::shutdown()).unwrap();
        assert!(rx.recv().unwrap().is_some());
        assert!(tx.recv().is_err());
        assert!(rx.send(StageMessage::shutdown()).is_err());
        drop(tx);
        assert!(rx.recv().unwrap().is_none());
    }
}
