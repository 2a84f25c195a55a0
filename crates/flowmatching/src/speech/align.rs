//! The phone of each spectrogram frame, from the synthesiser's phone events.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// The name of the silence phone (before the first phone event, and the synthesiser's pauses).
pub const SILENCE: &str = "_";

/// The phones of a corpus by name, numbered in order of first appearance; silence is phone 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<String>", into = "Vec<String>")]
pub struct PhoneInventory {
    names: Vec<String>,
    ids: HashMap<String, u32>,
}

impl From<Vec<String>> for PhoneInventory {
    fn from(names: Vec<String>) -> Self {
        Self::from_names(names)
    }
}

impl From<PhoneInventory> for Vec<String> {
    fn from(p: PhoneInventory) -> Self {
        p.names
    }
}

impl Default for PhoneInventory {
    fn default() -> Self {
        Self::from_names(vec![SILENCE.to_string()])
    }
}

impl PhoneInventory {
    /// An inventory with these phones, in this order.
    pub fn from_names(names: Vec<String>) -> Self {
        let ids = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i as u32))
            .collect();
        Self { names, ids }
    }

    /// The id of a phone, added to the inventory when new. Pauses ("_", "_:", ...) are silence.
    pub fn id(&mut self, name: &str) -> u32 {
        let name = if name.starts_with(SILENCE) {
            SILENCE
        } else {
            name
        };
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.names.len() as u32;
        self.names.push(name.to_string());
        self.ids.insert(name.to_string(), id);
        id
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// The phone of each of `frames` centred STFT frames with hop `hop`: frame j (centred on sample
/// j * hop) takes the phone of the last event at or before that sample; frames before the first event
/// are silence (phone 0). `events` are (sample, phone id) in order of time.
pub fn frame_phones(events: &[(usize, u32)], frames: usize, hop: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(frames);
    let mut next = 0;
    let mut current = 0;
    for j in 0..frames {
        let centre = j * hop;
        while next < events.len() && events[next].0 <= centre {
            current = events[next].1;
            next += 1;
        }
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_take_the_phone_sounding_at_their_centre() {
        // Events at samples 300 (phone 1), 700 (phone 2) and 710 (phone 3); hop 256.
        let got = frame_phones(&[(300, 1), (700, 2), (710, 3)], 5, 256);
        // Centres 0, 256, 512, 768, 1024: silence, silence, 1, 3 (2 was shorter than a hop), 3.
        assert_eq!(got, vec![0, 0, 1, 3, 3]);
        assert_eq!(frame_phones(&[], 3, 256), vec![0, 0, 0]);
    }

    #[test]
    fn the_inventory_numbers_phones_once_and_merges_pauses() {
        let mut inv = PhoneInventory::default();
        assert_eq!(inv.id("D"), 1);
        assert_eq!(inv.id("@"), 2);
        assert_eq!(inv.id("D"), 1);
        assert_eq!(inv.id("_:"), 0);
        assert_eq!(inv.names(), &["_", "D", "@"]);
        let back = PhoneInventory::from_names(inv.names().to_vec());
        assert_eq!(back, inv);
    }
}
