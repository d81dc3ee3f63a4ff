//! Gathering queued items into batches. Shared by the leader's batcher (client writes into log
//! entries, `node`) and a follower's forwarder (client writes into requests to the leader,
//! `forward`).
//!
//! Invariant: items leave in the order they arrived, except that an item the current batch
//! refuses waits, ahead of everything queued after it, for a later batch.

use std::collections::VecDeque;

use tokio::sync::mpsc;

/// A queue of items and those held back from earlier batches.
pub struct Gatherer<T> {
    queue: mpsc::UnboundedReceiver<T>,
    held: VecDeque<T>,
}

impl<T> Gatherer<T> {
    pub fn new(queue: mpsc::UnboundedReceiver<T>) -> Self {
        Gatherer {
            queue,
            held: VecDeque::new(),
        }
    }

    /// Waits for the next batch: the oldest held item or else the next queued one, then every
    /// held and already queued item that `admit` accepts, up to `max` items. `admit` sees the
    /// batch gathered so far (never empty) and a candidate. `None` once the queue is closed
    /// and nothing is held.
    pub async fn next_batch(
        &mut self,
        max: usize,
        mut admit: impl FnMut(&[T], &T) -> bool,
    ) -> Option<Vec<T>> {
        let first = match self.held.pop_front() {
            Some(item) => item,
            None => self.queue.recv().await?,
        };
        let mut batch = vec![first];
        let mut still_held = VecDeque::new();
        let mut consider = |item: T, batch: &mut Vec<T>| {
            if batch.len() < max && admit(batch, &item) {
                batch.push(item);
            } else {
                still_held.push_back(item);
            }
        };
        while let Some(item) = self.held.pop_front() {
            consider(item, &mut batch);
        }
        while batch.len() < max {
            match self.queue.try_recv() {
                Ok(item) => consider(item, &mut batch),
                Err(_) => break,
            }
        }
        self.held = still_held;
        Some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Odd and even numbers never share a batch; refused items keep their order.
    #[tokio::test]
    async fn batches_keep_arrival_order_and_hold_what_they_refuse() {
        let (send, receive) = mpsc::unbounded_channel();
        let mut gatherer = Gatherer::new(receive);
        for n in [1, 3, 2, 5, 4, 7] {
            send.send(n).ok();
        }
        let same_parity = |batch: &[u32], n: &u32| batch[0] % 2 == n % 2;
        assert_eq!(
            gatherer.next_batch(3, same_parity).await,
            Some(vec![1, 3, 5])
        );
        send.send(6).ok();
        assert_eq!(
            gatherer.next_batch(3, same_parity).await,
            Some(vec![2, 4, 6])
        );
        assert_eq!(gatherer.next_batch(3, same_parity).await, Some(vec![7]));
        drop(send);
        assert_eq!(gatherer.next_batch(3, same_parity).await, None);
    }
}
