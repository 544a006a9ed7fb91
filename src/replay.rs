//! Recovery beyond the in-memory history: a short-lived change stream from the client's last id, filtered to one room.

use std::sync::Arc;
use std::time::Duration;

use bson::doc;
use futures::future::BoxFuture;
use mongodb::Client;

use crate::event::EventId;
use crate::gateway::Replayer;
use crate::hub::{messages_for, Message};
use crate::mapper::MapperFactory;
use crate::room::Room;
use crate::source::{Source, SourceSpec};
use crate::token::StartAt;

/// Replays from the oplog with the same mapper the pipeline uses.
pub struct OplogReplayer {
    /// Driver client.
    pub client: Client,
    /// Watched databases.
    pub databases: Vec<String>,
    /// Watched collections.
    pub collections: Vec<String>,
    /// Fresh mapper per replay.
    pub mappers: MapperFactory,
    /// Most changes one replay may scan before giving up (the client then resyncs).
    pub max_changes: usize,
    /// Seals the replayed events' ids as the hub does.
    pub ids: Arc<crate::idcodec::IdCodec>,
}

impl OplogReplayer {
    async fn replay_db(
        &self,
        database: &str,
        room: &Room,
        since: &EventId,
        until: Option<&EventId>,
    ) -> Result<Vec<Arc<Message>>, String> {
        let spec = SourceSpec {
            database: database.to_owned(),
            collections: self.collections.clone(),
            // Short waits: an empty batch means the replay has caught up with the present.
            max_await: Duration::from_millis(50),
        };
        let start = StartAt::Token(doc! {"_data": since.as_str()});
        let mut source = Source::open(&self.client, spec, &start)
            .await
            .map_err(|e| e.to_string())?;
        let mut mapper = (self.mappers)();
        let mut out = Vec::new();
        for _ in 0..self.max_changes {
            let Some(change) = source.next().await.map_err(|e| e.to_string())? else {
                // An empty batch: caught up with the present, unless the hub is still ahead.
                let reached = match (
                    until,
                    source.token().as_ref().and_then(crate::token::event_id),
                ) {
                    (None, _) => true,
                    (Some(u), Some(t)) => t >= *u,
                    (Some(_), None) => false,
                };
                if reached {
                    return Ok(out);
                }
                continue;
            };
            for ev in mapper.map(&change) {
                if until.is_some_and(|u| ev.event.id > *u) {
                    return Ok(out);
                }
                if ev.deliveries.iter().any(|d| d.room == *room) {
                    out.extend(
                        messages_for(&ev, &self.ids)
                            .into_iter()
                            .filter(|m| m.room == *room),
                    );
                }
            }
        }
        Err(format!("more than {} changes to replay", self.max_changes))
    }
}

impl Replayer for OplogReplayer {
    fn replay<'a>(
        &'a self,
        room: &'a Room,
        since: &'a EventId,
        until: Option<EventId>,
    ) -> BoxFuture<'a, Result<Vec<Arc<Message>>, String>> {
        Box::pin(async move {
            let mut all = Vec::new();
            for db in &self.databases {
                all.extend(self.replay_db(db, room, since, until.as_ref()).await?);
            }
            // Streams of several databases interleave in commit order by id.
            all.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(all)
        })
    }
}
