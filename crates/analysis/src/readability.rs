//! The complexity grade used by the ablation report: the autorater's (persona-lens-rate)
//! Flesch-Kincaid grade, so ablation and steering runs score answers the same way.

pub use persona_lens_rate::readability::complexity_grade;
