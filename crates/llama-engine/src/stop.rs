//! Stop strings on streamed text.
//!
//! Text arrives in arbitrary pieces (one token's worth at a time), so a stop
//! string can be split across several pieces. Text that could be the start of
//! a stop string is held back until the next pieces show whether it is one;
//! everything else is released at once.
//!
//! Which occurrence wins: the one that is *completed* first while reading the
//! text from left to right, and among those ending at the same place the one
//! that starts first (e.g. "abc" beats "bc" in "abc", and "ab" beats "b c" in
//! "ab c"). This is what stopping "as soon as a stop string appears" means, and
//! it makes the result independent of how the text was split into pieces.
//! The two rules differ from "earliest start" only when a stop lies strictly
//! inside a longer one ("bc" inside "abcd"): the shorter one is completed
//! first, and generation cannot wait for the longer one without generating
//! past a stop string.

/// Finds stop strings in streamed text.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Received text not yet released: always shorter than the longest stop
    /// string between pushes, and no stop string starts before it.
    held: String,
    stopped: bool,
}

/// The result of feeding text to a [`StopMatcher`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text safe to send now; never contains any part of a matched stop string.
    pub emit: String,
    /// A stop string was found; `emit` is the text before it.
    pub stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would match everywhere); any number
    /// of stop strings, including none, is accepted.
    pub fn new(stops: Vec<String>) -> Self {
        let mut stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        stops.sort();
        stops.dedup();
        Self {
            stops,
            held: String::new(),
            stopped: false,
        }
    }

    /// Feeds newly detokenized text; returns the text that is safe to send now.
    /// Once a stop string has been found, further calls return nothing.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stopped {
            return StopOutcome {
                emit: String::new(),
                stopped: true,
            };
        }
        if self.stops.is_empty() {
            return StopOutcome {
                emit: text.to_string(),
                stopped: false,
            };
        }
        self.held.push_str(text);
        if let Some(start) = self.first_completed_stop() {
            self.held.truncate(start);
            self.stopped = true;
            return StopOutcome {
                emit: std::mem::take(&mut self.held),
                stopped: true,
            };
        }
        let keep_from = self.partial_match_start();
        let rest = self.held.split_off(keep_from);
        let emit = std::mem::replace(&mut self.held, rest);
        StopOutcome {
            emit,
            stopped: false,
        }
    }

    /// End of generation without a stop string: returns the held-back text.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// The most bytes that `push` can hold back (one less than the longest stop
    /// string).
    pub fn max_holdback(&self) -> usize {
        self.stops
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(0)
            .saturating_sub(1)
    }

    /// Whether a stop string has been found.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Start of the occurrence that ends first (then starts first) in `held`.
    /// No occurrence lies wholly inside the text held before this push (it
    /// would have been found then), so scanning `held` alone is enough.
    fn first_completed_stop(&self) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|stop| {
                self.held
                    .find(stop.as_str())
                    .map(|start| (start + stop.len(), start))
            })
            .min()
            .map(|(_, start)| start)
    }

    /// Where the held text must start being kept: the first position whose
    /// remainder is a proper prefix of some stop string. Only the last
    /// `max_holdback` bytes can qualify.
    fn partial_match_start(&self) -> usize {
        let len = self.held.len();
        let window_start = len.saturating_sub(self.max_holdback());
        self.held
            .char_indices()
            .map(|(i, _)| i)
            .skip_while(|&i| i < window_start)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|stop| stop.starts_with(tail))
            })
            .unwrap_or(len)
    }

    #[cfg(test)]
    fn held_len(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|s| s.to_string()).collect())
    }

    /// The definition, character by character: the first prefix of the text
    /// that ends with a stop string; of the stops ending there, the longest.
    fn expected(text: &str, stops: &[String]) -> (String, bool) {
        let ends = text.char_indices().map(|(i, c)| i + c.len_utf8());
        for end in ends {
            let seen = &text[..end];
            let longest = stops
                .iter()
                .filter(|s| !s.is_empty() && seen.ends_with(s.as_str()))
                .map(String::len)
                .max();
            if let Some(len) = longest {
                return (text[..end - len].to_string(), true);
            }
        }
        (text.to_string(), false)
    }

    /// Feeds `pieces`, checking the hold-back bound; returns (released text,
    /// stopped).
    fn run(stops: &[String], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.to_vec());
        let mut out = String::new();
        for piece in pieces {
            let outcome = m.push(piece);
            out.push_str(&outcome.emit);
            if outcome.stopped {
                assert!(m.is_stopped());
                return (out, true);
            }
            assert!(m.held_len() <= m.max_holdback());
            // Held back only what can still become a stop string.
            assert!(m.held.is_empty() || m.stops.iter().any(|s| s.starts_with(m.held.as_str())));
        }
        out.push_str(&m.flush());
        (out, false)
    }

    fn owned(stops: &[&str]) -> Vec<String> {
        stops.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn no_stops_passes_everything_through() {
        let mut m = matcher(&[]);
        assert_eq!(m.max_holdback(), 0);
        assert_eq!(
            m.push("abc"),
            StopOutcome {
                emit: "abc".into(),
                stopped: false
            }
        );
        assert_eq!(m.flush(), "");
        let mut m = matcher(&["", ""]);
        assert_eq!(m.push("x").emit, "x");
    }

    #[test]
    fn releases_text_as_soon_as_it_cannot_be_a_stop() {
        let mut m = matcher(&["\n\n"]);
        assert_eq!(m.push("a\n").emit, "a");
        assert_eq!(m.push("b").emit, "\nb");
        assert_eq!(m.push("\n").emit, "");
        let out = m.push("\nrest");
        assert_eq!(
            out,
            StopOutcome {
                emit: String::new(),
                stopped: true
            }
        );
        assert_eq!(
            m.push("more"),
            StopOutcome {
                emit: String::new(),
                stopped: true
            }
        );
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn stop_split_across_three_pushes() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(m.push("hello S").emit, "hello ");
        assert_eq!(m.push("T").emit, "");
        let out = m.push("OP and more");
        assert_eq!(
            out,
            StopOutcome {
                emit: String::new(),
                stopped: true
            }
        );
    }

    #[test]
    fn false_start_is_released_with_the_next_piece() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(m.push("ST").emit, "");
        assert_eq!(m.push("OAT").emit, "STOAT");
        assert_eq!(m.flush(), "");
        let mut m = matcher(&["STOP"]);
        assert_eq!(m.push("STO").emit, "");
        assert_eq!(m.flush(), "STO");
    }

    #[test]
    fn stop_at_the_very_start() {
        let mut m = matcher(&["User:"]);
        assert_eq!(
            m.push("User: hi"),
            StopOutcome {
                emit: String::new(),
                stopped: true
            }
        );
    }

    #[test]
    fn overlapping_stops_give_the_earliest_match() {
        assert_eq!(
            run(&owned(&["b c", "ab"]), &["xa", "b", " c"]),
            ("x".into(), true)
        );
        assert_eq!(
            run(&owned(&["bc", "abc"]), &["xab", "c"]),
            ("x".into(), true)
        );
        assert_eq!(run(&owned(&["bc", "abc"]), &["xabc"]), ("x".into(), true));
        // A stop inside a longer one is completed first.
        assert_eq!(
            run(&owned(&["abcd", "bc"]), &["xabcd"]),
            ("xa".into(), true)
        );
        assert_eq!(
            run(&owned(&["abcd", "bc"]), &["xab", "cd"]),
            ("xa".into(), true)
        );
        // Self-overlapping stop.
        assert_eq!(run(&owned(&["aab"]), &["aa", "aab"]), ("aa".into(), true));
    }

    #[test]
    fn unicode_stops_never_split_a_character() {
        let stops = owned(&["€€", "日本"]);
        let mut m = StopMatcher::new(stops.clone());
        assert_eq!(m.max_holdback(), 5);
        assert_eq!(m.push("a€").emit, "a");
        assert_eq!(m.push("b日").emit, "€b");
        assert_eq!(m.push("本語").emit, "");
        assert_eq!(run(&stops, &["x€", "y", "€", "€z"]), ("x€y".into(), true));
        assert_eq!(run(&owned(&["é"]), &["café"]), ("caf".into(), true));
        assert_eq!(run(&owned(&["e"]), &["café"]), ("café".into(), false));
    }

    #[test]
    fn many_stops() {
        let stops: Vec<String> = (0..100).map(|i| format!("<{i}>")).collect();
        assert_eq!(run(&stops, &["text <4", "2> tail"]), ("text ".into(), true));
        assert_eq!(
            run(&stops, &["text <x> <1", "00>"]),
            ("text <x> <100>".into(), false)
        );
    }

    fn split(text: &str, cuts: &[usize]) -> Vec<String> {
        let boundaries: Vec<usize> = text
            .char_indices()
            .map(|(i, _)| i)
            .chain([text.len()])
            .collect();
        let mut points: Vec<usize> = cuts
            .iter()
            .map(|c| boundaries[c % boundaries.len()])
            .collect();
        points.extend([0, text.len()]);
        points.sort_unstable();
        // Duplicate points give empty pieces, which must be harmless too.
        points
            .windows(2)
            .map(|w| text[w[0]..w[1]].to_string())
            .collect()
    }

    fn text_strategy(max: usize) -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![Just('a'), Just('b'), Just(' '), Just('€'), Just('é')],
            0..max,
        )
        .prop_map(|chars| chars.into_iter().collect())
    }

    proptest! {
        #[test]
        fn released_text_is_the_text_before_the_first_stop(
            text in text_strategy(40),
            stops in proptest::collection::vec(text_strategy(5), 0..5),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let pieces = split(&text, &cuts);
            let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
            prop_assert_eq!(run(&stops, &pieces), expected(&text, &stops));
            prop_assert_eq!(run(&stops, &[text.as_str()]), expected(&text, &stops));
        }
    }
}
