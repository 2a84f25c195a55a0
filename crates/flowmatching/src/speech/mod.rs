//! A speech corpus made on the machine, for sequence infilling (Voicebox-style): sentences from a
//! small grammar, the phone of every spectrogram frame from the synthesiser's own phone events, and the
//! corpus files (log-mel frames, phones, speakers) with their train/test split.
//!
//! The synthesis itself (espeak-ng) lives with the command-line tool; this module takes its audio and
//! phone events and turns them into training data.
//!
//! - [`sentences`]: distinct sentences from a grammar over a fixed word list;
//! - [`align`]: the phone inventory and the phone of each frame;
//! - [`corpus`]: utterances, the corpus files, and loading a split as a [`crate::data::SequenceDataset`].

pub mod align;
pub mod corpus;
pub mod sentences;

pub use align::{frame_phones, PhoneInventory, SILENCE};
pub use corpus::{Corpus, CorpusMeta, Split, Utterance, UtteranceInfo};
pub use sentences::sentences;
