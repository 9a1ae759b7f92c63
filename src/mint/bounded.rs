//! A bound on the calls in flight to one backend's upstream (`limits.backend_max_outstanding`):
//! when AWS, GitHub or a database slows down, exchanges waiting on it pile up to this many, and
//! the next one is told to retry instead of holding a task, a socket and memory without end.

use super::{Backend, BoxFuture, MintContext, MintError, Minted, Orphan, Revocation, RevokeHandle};
use crate::clock::UnixSeconds;
use crate::policy::{Grant, GrantedCredential};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

pub struct Bounded {
    inner: Arc<dyn Backend>,
    slots: Semaphore,
    max: usize,
    /// How long a mint waits for a slot before it is refused (revocations wait their turn).
    wait: Duration,
}

impl Bounded {
    pub fn new(inner: Arc<dyn Backend>, max: usize, wait: Duration) -> Bounded {
        Bounded { inner, slots: Semaphore::new(max), max, wait }
    }
}

impl Backend for Bounded {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn revocation(&self) -> Revocation {
        self.inner.revocation()
    }

    fn quiet_at_expiry(&self) -> bool {
        self.inner.quiet_at_expiry()
    }

    fn mint<'a>(
        &'a self,
        grant: &'a Grant,
        credential: &'a GrantedCredential,
        ctx: MintContext<'a>,
    ) -> BoxFuture<'a, Result<Minted, MintError>> {
        Box::pin(async move {
            let Ok(Ok(_slot)) = tokio::time::timeout(self.wait, self.slots.acquire()).await else {
                return Err(MintError {
                    detail: format!(
                        "{} upstream calls in flight, the bound; none finished within {:?}",
                        self.max, self.wait
                    ),
                    advice: Some(
                        "its upstream is slow and the broker's bound on calls to it is reached; retry shortly".into(),
                    ),
                    retry_after_secs: Some(1),
                });
            };
            self.inner.mint(grant, credential, ctx).await
        })
    }

    fn revoke<'a>(&'a self, handle: &'a RevokeHandle) -> BoxFuture<'a, Result<(), MintError>> {
        Box::pin(async move {
            let _slot = self.slots.acquire().await.map_err(|_| MintError::new("backend bound closed"))?;
            self.inner.revoke(handle).await
        })
    }

    fn maintain<'a>(&'a self, now: UnixSeconds) -> BoxFuture<'a, ()> {
        self.inner.maintain(now)
    }

    fn adopt(&self, handle: &RevokeHandle) {
        self.inner.adopt(handle);
    }

    fn adopts(&self) -> bool {
        self.inner.adopts()
    }

    fn orphans<'a>(&'a self, now: UnixSeconds) -> BoxFuture<'a, Vec<Orphan>> {
        self.inner.orphans(now)
    }

    fn learn_ended(&self, handle: &RevokeHandle) {
        self.inner.learn_ended(handle);
    }

    fn learns_ended(&self) -> bool {
        self.inner.learns_ended()
    }

    fn rate_limit_remaining(&self) -> Option<u64> {
        self.inner.rate_limit_remaining()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An upstream that counts the calls in flight and answers when the test lets it.
    struct Slow {
        in_flight: AtomicUsize,
        most: AtomicUsize,
        gate: Arc<Semaphore>,
    }

    impl Backend for Slow {
        fn kind(&self) -> &'static str {
            "aws"
        }
        fn revocation(&self) -> Revocation {
            Revocation::Immediate
        }
        fn mint<'a>(
            &'a self,
            _: &'a Grant,
            _: &'a GrantedCredential,
            _: MintContext<'a>,
        ) -> BoxFuture<'a, Result<Minted, MintError>> {
            Box::pin(async { Err(MintError::new("not used")) })
        }
        fn revoke<'a>(&'a self, _: &'a RevokeHandle) -> BoxFuture<'a, Result<(), MintError>> {
            Box::pin(async move {
                let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                self.most.fetch_max(now, Ordering::SeqCst);
                let _pass = self.gate.acquire().await.map_err(|_| MintError::new("closed"))?;
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            })
        }
    }

    #[tokio::test]
    async fn calls_past_the_bound_wait_their_turn_and_never_reach_the_upstream_together() {
        let gate = Arc::new(Semaphore::new(0));
        let slow = Arc::new(Slow { in_flight: AtomicUsize::new(0), most: AtomicUsize::new(0), gate: gate.clone() });
        let bounded = Arc::new(Bounded::new(slow.clone(), 2, Duration::from_millis(10)));
        let handle = RevokeHandle { backend: "aws".into(), data: serde_json::json!({}) };
        let calls: Vec<_> = (0..6)
            .map(|_| {
                let (bounded, handle) = (bounded.clone(), handle.clone());
                tokio::spawn(async move { bounded.revoke(&handle).await })
            })
            .collect();
        // Let every call get as far as it can: two reach the upstream, four wait for a slot.
        while slow.in_flight.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(slow.in_flight.load(Ordering::SeqCst), 2);
        gate.add_permits(6);
        for call in calls {
            assert!(call.await.unwrap().is_ok(), "a revocation past the bound waits, it is not refused");
        }
        assert_eq!(slow.most.load(Ordering::SeqCst), 2, "never more than the bound at the upstream");
    }
}
