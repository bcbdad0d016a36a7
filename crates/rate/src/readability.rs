//! Text counts and the classic readability formulas, each a plain function of the counts so it
//! can be checked against published worked examples independently of how the text is counted.
//!
//! Counting conventions (one set for every formula): a word is a whitespace-separated token with a
//! letter or digit after trimming punctuation (hyphenated words are one word, as in SMOG's
//! rules); a sentence ends at `.`, `!` or `?` (repeats collapse) or at the end of the text;
//! syllables come from a vowel-group heuristic with English suffix rules (silent final `e`,
//! `-ed`, `-es`; `ia` as two syllables after consonants other than c, t, s, g); ARI's characters
//! are letters and digits (Senter & Smith's "strokes", as Wikipedia defines them: the Rust
//! `textstat` crate counts punctuation too, so it is a cross-check, not the implementation).

use std::collections::HashSet;
use std::sync::OnceLock;

/// Syllables of one word (letters only; at least 1 for a word with letters).
pub fn syllables(word: &str) -> usize {
    let w: Vec<char> = word
        .chars()
        .filter(|c| c.is_ascii_alphabetic())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if w.is_empty() {
        return 0;
    }
    let l = w.len();
    let is_v = |i: usize| matches!(w[i], 'a' | 'e' | 'i' | 'o' | 'u') || (w[i] == 'y' && i > 0);
    let mut n = 0;
    let mut prev = false;
    for i in 0..l {
        let v = is_v(i);
        if v && !prev {
            n += 1;
        }
        prev = v;
    }
    // "ia" is two syllables (Austral-i-an, reptil-i-an) except in -cia/-tia/-sia/-gia (spe-cial).
    for i in 1..l.saturating_sub(1) {
        if w[i] == 'i' && w[i + 1] == 'a' && !matches!(w[i - 1], 'c' | 't' | 's' | 'g') {
            n += 1;
        }
    }
    let ends = |s: &str| l > s.len() && w[l - s.len()..].iter().copied().eq(s.chars());
    if n > 1 {
        if ends("e") && !is_v(l - 2) && !(ends("le") && l > 2 && !is_v(l - 3)) {
            n -= 1; // silent final e: make, creature (but ta-ble)
        } else if ends("ed") && !matches!(w[l - 3], 't' | 'd') && !is_v(l - 3) {
            n -= 1; // jumped, called (but wanted, needed)
        } else if ends("es") && silent_es(&w) && !is_v(l - 3) {
            n -= 1; // makes, times (but boxes, wishes, pages)
        }
    }
    n.max(1)
}

/// A final "es" adds no syllable except after sibilants (boxes, wishes, pages).
fn silent_es(w: &[char]) -> bool {
    let l = w.len();
    let sibilant = matches!(w[l - 3], 's' | 'x' | 'z' | 'c' | 'g')
        || (l > 3 && matches!(&w[l - 4..l - 2], ['c', 'h'] | ['s', 'h']));
    !sibilant
}

fn familiar_words() -> &'static HashSet<String> {
    static SET: OnceLock<HashSet<String>> = OnceLock::new();
    SET.get_or_init(|| {
        include_str!("../data/dale_chall_familiar_words.txt")
            .lines()
            .map(|l| l.trim().to_lowercase())
            .filter(|l| !l.is_empty())
            .collect()
    })
}

/// Familiar in the New Dale-Chall sense: on the list, a number, or a regular inflection of a
/// listed word (plural, past tense, -ing, comparative, -ly), as the formula's rules allow.
pub fn is_familiar(word: &str) -> bool {
    let w: String = word
        .trim_end_matches("'s")
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '\'')
        .collect::<String>()
        .to_lowercase();
    if w.is_empty() || w.chars().any(|c| c.is_ascii_digit()) {
        return true;
    }
    let set = familiar_words();
    if set.contains(&w) {
        return true;
    }
    for suf in ["s", "es", "ed", "d", "ing", "er", "est", "ly", "ies", "ied"] {
        if let Some(stem) = w.strip_suffix(suf) {
            if stem.len() >= 2 {
                if set.contains(stem) {
                    return true;
                }
                // carried -> carry, making -> make, bigger -> big
                if (suf == "ies" || suf == "ied") && set.contains(&format!("{stem}y")) {
                    return true;
                }
                if (suf == "ing" || suf == "ed" || suf == "er" || suf == "est")
                    && set.contains(&format!("{stem}e"))
                {
                    return true;
                }
                let b = stem.as_bytes();
                if b.len() >= 3
                    && b[b.len() - 1] == b[b.len() - 2]
                    && set.contains(&stem[..stem.len() - 1])
                {
                    return true;
                }
            }
        }
    }
    false
}

/// Everything the formulas need, counted once.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    pub words: usize,
    pub sentences: usize,
    pub syllables: usize,
    /// Words of 3+ syllables (SMOG).
    pub polysyllables: usize,
    /// Gunning's complex words: 3+ syllables not counting an -es/-ed/-ing ending, excluding
    /// hyphenated compounds and capitalised words inside a sentence (proper nouns).
    pub complex_words: usize,
    pub letters: usize,
    /// Letters and digits (ARI).
    pub characters: usize,
    /// Words not familiar in the New Dale-Chall sense.
    pub difficult_words: usize,
}

fn clean(tok: &str) -> &str {
    tok.trim_matches(|c: char| !c.is_alphanumeric())
}

/// Counts a text.
pub fn counts(text: &str) -> Counts {
    let mut c = Counts::default();
    let mut in_sentence = false;
    let mut sentence_start = true;
    for tok in text.split_whitespace() {
        let w = clean(tok);
        let is_word = w.chars().any(|ch| ch.is_alphanumeric());
        if is_word {
            c.words += 1;
            in_sentence = true;
            let s = syllables(w);
            c.syllables += s;
            if s >= 3 {
                c.polysyllables += 1;
            }
            let capitalised = w.chars().next().is_some_and(|ch| ch.is_uppercase());
            let stem = ["ing", "ed", "es"]
                .iter()
                .find_map(|suf| w.strip_suffix(suf).filter(|s| s.len() >= 3))
                .unwrap_or(w);
            let proper_noun = capitalised && !sentence_start;
            if !w.contains('-') && !proper_noun && syllables(stem) >= 3 {
                c.complex_words += 1;
            }
            c.letters += w.chars().filter(|ch| ch.is_alphabetic()).count();
            c.characters += w.chars().filter(|ch| ch.is_alphanumeric()).count();
            if !is_familiar(w) {
                c.difficult_words += 1;
            }
            sentence_start = false;
        }
        if tok
            .trim_end_matches(['"', '\'', ')', ']', '*'])
            .ends_with(['.', '!', '?'])
            && in_sentence
        {
            c.sentences += 1;
            in_sentence = false;
            sentence_start = true;
        }
    }
    if in_sentence {
        c.sentences += 1;
    }
    c
}

/// The seven scores; None where a formula is undefined (no words).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Readability {
    pub flesch_reading_ease: f64,
    pub flesch_kincaid_grade: f64,
    pub gunning_fog: f64,
    pub smog: f64,
    pub coleman_liau: f64,
    pub ari: f64,
    pub new_dale_chall: f64,
}

fn ratio(a: usize, b: usize) -> f64 {
    a as f64 / b as f64
}

/// Flesch (1948): 206.835 - 1.015 words/sentence - 84.6 syllables/word.
pub fn flesch_reading_ease(c: &Counts) -> f64 {
    206.835 - 1.015 * ratio(c.words, c.sentences) - 84.6 * ratio(c.syllables, c.words)
}

/// Kincaid et al. (1975): 0.39 words/sentence + 11.8 syllables/word - 15.59.
pub fn flesch_kincaid_grade(c: &Counts) -> f64 {
    0.39 * ratio(c.words, c.sentences) + 11.8 * ratio(c.syllables, c.words) - 15.59
}

/// Gunning (1952): 0.4 (words/sentence + 100 complex/words).
pub fn gunning_fog(c: &Counts) -> f64 {
    0.4 * (ratio(c.words, c.sentences) + 100.0 * ratio(c.complex_words, c.words))
}

/// McLaughlin (1969): 1.0430 sqrt(polysyllables x 30 / sentences) + 3.1291.
pub fn smog(c: &Counts) -> f64 {
    1.0430 * (c.polysyllables as f64 * 30.0 / c.sentences as f64).sqrt() + 3.1291
}

/// Coleman & Liau (1975): 0.0588 L - 0.296 S - 15.8 (L letters, S sentences per 100 words).
pub fn coleman_liau(c: &Counts) -> f64 {
    0.0588 * 100.0 * ratio(c.letters, c.words) - 0.296 * 100.0 * ratio(c.sentences, c.words) - 15.8
}

/// Senter & Smith (1967): 4.71 characters/word + 0.5 words/sentence - 21.43.
pub fn ari(c: &Counts) -> f64 {
    4.71 * ratio(c.characters, c.words) + 0.5 * ratio(c.words, c.sentences) - 21.43
}

/// Chall & Dale (1995): 0.1579 x percent difficult words + 0.0496 words/sentence, + 3.6365
/// when more than 5 % of the words are difficult.
pub fn new_dale_chall(c: &Counts) -> f64 {
    let pdw = 100.0 * ratio(c.difficult_words, c.words);
    let raw = 0.1579 * pdw + 0.0496 * ratio(c.words, c.sentences);
    if pdw > 5.0 {
        raw + 3.6365
    } else {
        raw
    }
}

pub fn readability(c: &Counts) -> Option<Readability> {
    if c.words == 0 || c.sentences == 0 {
        return None;
    }
    Some(Readability {
        flesch_reading_ease: flesch_reading_ease(c),
        flesch_kincaid_grade: flesch_kincaid_grade(c),
        gunning_fog: gunning_fog(c),
        smog: smog(c),
        coleman_liau: coleman_liau(c),
        ari: ari(c),
        new_dale_chall: new_dale_chall(c),
    })
}

/// The one complexity grade other analyses use (higher = harder): Flesch-Kincaid grade.
pub fn complexity_grade(text: &str) -> Option<f64> {
    readability(&counts(text)).map(|r| r.flesch_kincaid_grade)
}
