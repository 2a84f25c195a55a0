//! Sentences for the corpus: a small English grammar over a fixed word list, so that the corpus needs
//! no text from outside and every sentence is new to the test split when the split is by sentence.

use std::collections::HashSet;

use crate::rng::Rng;

const NAMES: &[&str] = &[
    "anna", "peter", "maria", "john", "sarah", "david", "laura", "thomas", "emma", "robert",
    "julia", "michael",
];
const ADJECTIVES: &[&str] = &[
    "small", "large", "green", "quiet", "happy", "old", "young", "bright", "dark", "heavy",
    "gentle", "clever", "cold", "warm", "yellow", "tired",
];
const NOUNS: &[&str] = &[
    "dog", "cat", "teacher", "garden", "river", "window", "table", "farmer", "doctor", "bird",
    "kitchen", "letter", "mountain", "city", "painter", "horse", "boat", "forest",
];
const PLURALS: &[&str] = &[
    "apples", "books", "chairs", "flowers", "stones", "songs", "ideas", "pictures", "bottles",
    "horses", "candles", "shoes",
];
const VERBS_PAST: &[&str] = &[
    "found",
    "painted",
    "carried",
    "watched",
    "followed",
    "opened",
    "visited",
    "cleaned",
    "noticed",
    "remembered",
    "described",
    "repaired",
];
const VERBS_BASE: &[&str] = &[
    "find", "paint", "carry", "watch", "follow", "open", "visit", "clean", "notice", "describe",
];
const ADVERBS: &[&str] = &[
    "slowly",
    "quickly",
    "carefully",
    "often",
    "yesterday",
    "again",
    "quietly",
    "early",
    "today",
];
const PLACES: &[&str] = &[
    "near the river",
    "in the garden",
    "behind the house",
    "at the market",
    "on the hill",
    "under the bridge",
    "by the window",
];
const NUMBERS: &[&str] = &[
    "two", "three", "four", "five", "seven", "nine", "ten", "twelve",
];

fn pick<'a>(rng: &mut Rng, words: &[&'a str]) -> &'a str {
    words[rng.below(words.len())]
}

/// One sentence from one of the grammar's patterns.
fn sentence(rng: &mut Rng) -> String {
    let mut w = |list: &[&'static str]| pick(rng, list);
    match w(&["0", "1", "2", "3", "4", "5"]) {
        "0" => format!(
            "the {} {} {} the {} {}.",
            w(ADJECTIVES),
            w(NOUNS),
            w(VERBS_PAST),
            w(ADJECTIVES),
            w(NOUNS)
        ),
        "1" => format!(
            "{} {} {} {} {}.",
            w(NAMES),
            w(VERBS_PAST),
            w(NUMBERS),
            w(ADJECTIVES),
            w(PLURALS)
        ),
        "2" => format!(
            "a {} {} {} {}.",
            w(NOUNS),
            w(VERBS_PAST),
            w(ADVERBS),
            w(PLACES)
        ),
        "3" => format!(
            "did the {} {} the {} {}?",
            w(NOUNS),
            w(VERBS_BASE),
            w(ADJECTIVES),
            w(NOUNS)
        ),
        "4" => format!(
            "{} and {} {} the {} {}.",
            w(NAMES),
            w(NAMES),
            w(VERBS_PAST),
            w(NOUNS),
            w(ADVERBS)
        ),
        _ => format!(
            "{} {} the {} {} {}.",
            w(ADVERBS),
            w(NAMES),
            w(VERBS_PAST),
            w(PLURALS),
            w(PLACES)
        ),
    }
}

/// `n` distinct sentences drawn from the grammar by `seed`, in the order drawn. The grammar has more
/// than 10^6 sentences, so any corpus size this project uses is reached quickly.
pub fn sentences(n: usize, seed: u64) -> Vec<String> {
    let mut rng = Rng::new(seed);
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let s = sentence(&mut rng);
        if seen.insert(s.clone()) {
            out.push(s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_are_distinct_reproducible_and_varied() {
        let a = sentences(500, 3);
        assert_eq!(a, sentences(500, 3));
        assert_ne!(a, sentences(500, 4));
        let set: HashSet<&String> = a.iter().collect();
        assert_eq!(set.len(), 500);
        let starts: HashSet<&str> = a.iter().map(|s| s.split(' ').next().unwrap()).collect();
        assert!(starts.len() > 10, "{starts:?}");
        assert!(a.iter().all(|s| s.ends_with('.') || s.ends_with('?')));
    }
}
