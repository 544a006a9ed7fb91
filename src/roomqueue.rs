//! A room's messages in the hub's history: the first one inline, more in a deque.
//!
//! Most rooms in history hold one message: an order's own room sees a change or two
//! before it leaves history. A `VecDeque` per room was one allocation (and one free
//! at eviction) per change for those alone.

use std::collections::VecDeque;

/// Oldest first. Empty only after the last message was popped (the hub then drops it).
pub(crate) enum RoomQueue<T> {
    /// Exactly one message.
    One(T),
    /// None, or more than one (or what is left of more than one).
    Many(VecDeque<T>),
}

impl<T> Default for RoomQueue<T> {
    fn default() -> Self {
        Self::Many(VecDeque::new())
    }
}

impl<T> RoomQueue<T> {
    /// Appends `x` at the back.
    pub(crate) fn push_back(&mut self, x: T) {
        match self {
            Self::Many(d) if d.is_empty() => *self = Self::One(x),
            Self::Many(d) => d.push_back(x),
            Self::One(_) => {
                let Self::One(first) = std::mem::take(self) else {
                    unreachable!("matched One above")
                };
                let mut d = VecDeque::with_capacity(4);
                d.push_back(first);
                d.push_back(x);
                *self = Self::Many(d);
            }
        }
    }

    /// The oldest message.
    pub(crate) fn front(&self) -> Option<&T> {
        match self {
            Self::One(x) => Some(x),
            Self::Many(d) => d.front(),
        }
    }

    /// Takes the oldest message out.
    pub(crate) fn pop_front(&mut self) -> Option<T> {
        match self {
            Self::One(_) => match std::mem::take(self) {
                Self::One(x) => Some(x),
                Self::Many(_) => unreachable!("matched One above"),
            },
            Self::Many(d) => d.pop_front(),
        }
    }

    /// Whether it holds nothing.
    pub(crate) fn is_empty(&self) -> bool {
        matches!(self, Self::Many(d) if d.is_empty())
    }

    /// How many messages it holds.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        match self {
            Self::One(_) => 1,
            Self::Many(d) => d.len(),
        }
    }

    /// The messages in order, as two slices (the second may be empty).
    fn as_slices(&self) -> (&[T], &[T]) {
        match self {
            Self::One(x) => (std::slice::from_ref(x), &[]),
            Self::Many(d) => d.as_slices(),
        }
    }

    /// The messages, oldest first.
    pub(crate) fn iter(&self) -> impl DoubleEndedIterator<Item = &T> {
        let (a, b) = self.as_slices();
        a.iter().chain(b)
    }

    /// The messages from position `start` on (none when past the end), without
    /// stepping over the ones before it.
    pub(crate) fn iter_from(&self, start: usize) -> impl Iterator<Item = &T> {
        let (a, b) = self.as_slices();
        let (a, b) = match a.get(start..) {
            Some(rest) => (rest, b),
            None => (&[][..], b.get(start - a.len()..).unwrap_or_default()),
        };
        a.iter().chain(b)
    }

    /// How many leading messages satisfy `pred`, which must hold for a prefix only
    /// (as `slice::partition_point`).
    pub(crate) fn partition_point(&self, mut pred: impl FnMut(&T) -> bool) -> usize {
        let (a, b) = self.as_slices();
        let i = a.partition_point(&mut pred);
        if i < a.len() {
            i
        } else {
            a.len() + b.partition_point(pred)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(q: &RoomQueue<u32>) -> Vec<u32> {
        q.iter().copied().collect()
    }

    #[test]
    fn holds_one_inline_then_many_in_order() {
        let mut q = RoomQueue::default();
        assert!(q.is_empty());
        assert_eq!(q.front(), None);
        q.push_back(1);
        assert!(matches!(q, RoomQueue::One(1)));
        q.push_back(2);
        q.push_back(3);
        assert_eq!(items(&q), [1, 2, 3]);
        assert_eq!(q.len(), 3);
        assert_eq!(q.iter().rev().copied().collect::<Vec<_>>(), [3, 2, 1]);
        assert_eq!(q.pop_front(), Some(1));
        assert_eq!(q.front(), Some(&2));
        assert_eq!(q.pop_front(), Some(2));
        assert_eq!(q.pop_front(), Some(3));
        assert!(q.is_empty());
        assert_eq!(q.pop_front(), None);
        // Emptied, it starts over inline.
        q.push_back(4);
        assert!(matches!(q, RoomQueue::One(4)));
        assert_eq!(q.pop_front(), Some(4));
        assert!(q.is_empty());
    }

    #[test]
    fn partition_point_spans_both_halves_of_a_wrapped_deque() {
        let mut q = RoomQueue::default();
        for i in 0..4 {
            q.push_back(i);
        }
        // Pop and push until the deque's storage wraps around.
        for i in 4..7 {
            assert_eq!(q.pop_front(), Some(i - 4));
            q.push_back(i);
        }
        assert_eq!(items(&q), [3, 4, 5, 6]);
        for cut in 0..=8 {
            let want = items(&q).partition_point(|x| *x < cut);
            assert_eq!(q.partition_point(|x| *x < cut), want, "cut {cut}");
        }
        for start in 0..=6 {
            let want: Vec<u32> = items(&q).into_iter().skip(start).collect();
            assert_eq!(
                q.iter_from(start).copied().collect::<Vec<_>>(),
                want,
                "start {start}"
            );
        }
        let one = {
            let mut q = RoomQueue::default();
            q.push_back(5);
            q
        };
        assert_eq!(one.partition_point(|x| *x < 5), 0);
        assert_eq!(one.partition_point(|x| *x < 6), 1);
    }
}
