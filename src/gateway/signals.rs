//! The stop and kick signals of a session's loop as one future that looks at its tokens only when one of them has woken it.
//!
//! `select!` polls every branch each time the task wakes, and a session wakes once per
//! delivery. Polling a token's `cancelled()` future takes the token's mutex each time,
//! and the stop token is one that every session shares: two locks per delivery, one of
//! them on a cache line that both cores fight over (about 3% of the server's CPU when
//! it broadcasts). The tokens' futures here get a waker of their own that records that
//! it fired, so they are polled only on the wake they caused (and once to register).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Which signal ended the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    /// The server is shutting down.
    Stop,
    /// The hub cut the session off (its mailbox overflowed).
    Kick,
}

/// Stands between the tokens' futures and the task: the tokens wake it, it notes that
/// and wakes the task.
#[derive(Default)]
struct Gate {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Noted before the task is woken, so the poll that wake causes sees it.
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

pin_project_lite::pin_project! {
    /// Ready when the stop token or the kick token is cancelled (stop first when both are).
    pub(crate) struct Signals {
        #[pin]
        stopping: WaitForCancellationFutureOwned,
        #[pin]
        kicking: WaitForCancellationFutureOwned,
        gate: Arc<Gate>,
        waker: Waker,
        armed: bool,
    }
}

impl Signals {
    pub(crate) fn new(stop: CancellationToken, kicked: CancellationToken) -> Self {
        let gate = Arc::new(Gate::default());
        Self {
            stopping: stop.cancelled_owned(),
            kicking: kicked.cancelled_owned(),
            waker: Waker::from(gate.clone()),
            gate,
            armed: false,
        }
    }
}

impl Future for Signals {
    type Output = Signal;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Signal> {
        let this = self.project();
        // Registered before `woken` is read: a token cancelled after the read wakes
        // this very waker, so the task is polled again and reads `woken` then.
        this.gate.task.register(cx.waker());
        if *this.armed && !this.gate.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        // The first poll registers the gate's waker with both tokens; a later one runs
        // only after that waker fired. (A spurious look is harmless: the tokens'
        // futures check their token and register again.)
        *this.armed = true;
        let mut cx = Context::from_waker(this.waker);
        if this.stopping.poll(&mut cx).is_ready() {
            return Poll::Ready(Signal::Stop);
        }
        if this.kicking.poll(&mut cx).is_ready() {
            return Poll::Ready(Signal::Kick);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn pending_for_a_while(s: Pin<&mut Signals>) -> Option<Signal> {
        tokio::time::timeout(Duration::from_millis(50), s)
            .await
            .ok()
    }

    #[tokio::test]
    async fn nothing_fires_until_a_token_is_cancelled() {
        let (stop, kick) = (CancellationToken::new(), CancellationToken::new());
        let s = Signals::new(stop.clone(), kick.clone());
        tokio::pin!(s);
        assert_eq!(pending_for_a_while(s.as_mut()).await, None);
        assert_eq!(pending_for_a_while(s.as_mut()).await, None);
    }

    #[tokio::test]
    async fn a_kick_after_the_first_poll_wakes_the_task() {
        let (stop, kick) = (CancellationToken::new(), CancellationToken::new());
        let s = Signals::new(stop.clone(), kick.clone());
        tokio::pin!(s);
        assert_eq!(pending_for_a_while(s.as_mut()).await, None);
        let k = kick.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            k.cancel();
        });
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), s).await,
            Ok(Signal::Kick)
        );
    }

    #[tokio::test]
    async fn a_stop_shared_by_many_wakes_each_of_them() {
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let s = Signals::new(stop.clone(), CancellationToken::new());
            tasks.push(tokio::spawn(async move {
                tokio::pin!(s);
                // Polled from a select that another branch wakes too, as the loop does.
                let mut ticks = 0u32;
                loop {
                    tokio::select! {
                        biased;
                        sig = &mut s => return (sig, ticks),
                        _ = tokio::time::sleep(Duration::from_millis(1)) => ticks += 1,
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        stop.cancel();
        for t in tasks {
            let (sig, ticks) = tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .expect("every session sees the stop")
                .expect("task");
            assert_eq!(sig, Signal::Stop);
            assert!(ticks > 0, "the other branch ran meanwhile");
        }
    }

    #[tokio::test]
    async fn stop_wins_when_both_are_cancelled() {
        let (stop, kick) = (CancellationToken::new(), CancellationToken::new());
        kick.cancel();
        stop.cancel();
        assert_eq!(Signals::new(stop, kick).await, Signal::Stop);
    }

    #[tokio::test]
    async fn a_token_cancelled_before_the_first_poll_is_seen_at_once() {
        let (stop, kick) = (CancellationToken::new(), CancellationToken::new());
        kick.cancel();
        let s = Signals::new(stop, kick);
        assert_eq!(s.await, Signal::Kick);
    }
}
