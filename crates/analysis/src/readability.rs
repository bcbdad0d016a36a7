//! A small readability measure for generated answers: the Flesch-Kincaid grade level
//! (Kincaid et al. 1975): `0.39 * words/sentences + 11.8 * syllables/words - 15.59`, with a
//! vowel-group syllable heuristic. The autorater (its own crate) replaces this with the full
//! formula set; callers go through [`complexity_grade`] so the swap is one function.

/// Syllables of one word: vowel groups (y counts as a vowel after the first letter), minus a
/// silent final `e` (not `le`), at least 1.
pub fn syllables(word: &str) -> usize {
    let w: Vec<char> = word
        .chars()
        .filter(|c| c.is_ascii_alphabetic())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if w.is_empty() {
        return 0;
    }
    let is_v = |i: usize| matches!(w[i], 'a' | 'e' | 'i' | 'o' | 'u') || (w[i] == 'y' && i > 0);
    let mut n = 0;
    let mut prev = false;
    for i in 0..w.len() {
        let v = is_v(i);
        if v && !prev {
            n += 1;
        }
        prev = v;
    }
    let l = w.len();
    let silent_e = l > 2 && w[l - 1] == 'e' && !is_v(l - 2) && (w[l - 2] != 'l' || is_v(l - 3));
    if silent_e && n > 1 {
        n -= 1;
    }
    n.max(1)
}

/// Word, sentence and syllable counts.
pub fn counts(text: &str) -> (usize, usize, usize) {
    let words: Vec<&str> = text
        .split_whitespace()
        .filter(|w| w.chars().any(|c| c.is_ascii_alphabetic()))
        .collect();
    let sentences = text
        .split(['.', '!', '?'])
        .filter(|s| s.chars().any(|c| c.is_alphanumeric()))
        .count()
        .max(1);
    let syl = words.iter().map(|w| syllables(w)).sum();
    (words.len(), sentences, syl)
}

/// Flesch-Kincaid grade level; None for text without words.
pub fn flesch_kincaid_grade(text: &str) -> Option<f64> {
    let (w, s, y) = counts(text);
    if w == 0 {
        return None;
    }
    Some(0.39 * w as f64 / s as f64 + 11.8 * y as f64 / w as f64 - 15.59)
}

/// The complexity score used by the ablation report (higher = harder text).
pub fn complexity_grade(text: &str) -> Option<f64> {
    flesch_kincaid_grade(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syllable_heuristic() {
        for (w, n) in [
            ("cat", 1),
            ("table", 2),
            ("make", 1),
            ("relativity", 5),
            ("the", 1),
            ("physics", 2),
            ("happy", 2),
        ] {
            assert_eq!(syllables(w), n, "{w}");
        }
    }

    #[test]
    fn fk_grade_by_hand() {
        // "The cat sat on the mat." 6 words, 1 sentence, 6 syllables:
        // 0.39 * 6 + 11.8 * 1 - 15.59 = -1.45
        let g = flesch_kincaid_grade("The cat sat on the mat.").unwrap();
        assert!((g - (-1.45)).abs() < 1e-9, "{g}");
        // Harder text scores higher.
        let hard = flesch_kincaid_grade(
            "Relativistic time dilation fundamentally reconceptualizes simultaneity.",
        )
        .unwrap();
        assert!(hard > 15.0, "{hard}");
        assert!(flesch_kincaid_grade("...").is_none());
    }
}
