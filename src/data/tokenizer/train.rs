//! Byte-pair-encoding training that produces a llama2.c vocabulary.
//!
//! Layout of the result: ids 0 `<unk>`, 1 `<s>`, 2 `</s>`, 3..=258 the byte
//! tokens `<0x00>`..`<0xFF>`, then the single characters of the corpus (most
//! frequent first, until `character_coverage` of all character occurrences is
//! covered; `" "` always), then one piece per learned merge in merge order.
//! Scores: the merge of rank r scores `-r`, so run.c's "merge the highest-scoring
//! pair first" replays the training order; characters score below every merge;
//! control and byte tokens score [`NO_MERGE_SCORE`] so that text spelling `<s>`
//! or `<0x41>` can never be merged into them.
//!
//! Words follow SentencePiece: the text gets a leading space, a word starts at
//! every space and carries it (stored as `" "`, SentencePiece's "▁"); `\n` and `\r`
//! are words of their own that never merge, so no piece spans a line break.
//! Characters outside the kept alphabet are byte-fallback at encode time and act
//! as merge barriers here.
//!
//! The trainer counts distinct words once, then keeps pair counts up to date
//! incrementally: a merge only revisits the words that contain its pair.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use rayon::prelude::*;

use super::{BYTE_OFFSET, N_RESERVED, NO_MERGE_SCORE, Tokenizer, byte_piece, parse_byte_piece};
use crate::{Error, Result};

/// Settings for [`train_bpe`].
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOptions {
    /// Total vocabulary size V including the 259 reserved ids. Training stops
    /// early (with a smaller vocabulary) only if no pair is left to merge.
    pub vocab_size: usize,
    /// Fraction of character occurrences the single-character pieces must cover
    /// (SentencePiece's `character_coverage`); rarer characters use byte fallback.
    pub character_coverage: f64,
    /// Longest merged piece, in characters (SentencePiece's default is 16).
    pub max_piece_chars: usize,
}

impl TrainOptions {
    /// Defaults for a vocabulary of `vocab_size`: coverage 0.9995, pieces up to 16 characters.
    pub fn new(vocab_size: usize) -> Self {
        TrainOptions {
            vocab_size,
            character_coverage: 0.9995,
            max_piece_chars: 16,
        }
    }
}

/// Symbol id of a character outside the alphabet: never part of a pair.
const BARRIER: u32 = u32::MAX;

type Pair = (u32, u32);

/// A distinct word and how often it occurs.
struct Word {
    symbols: Vec<u32>,
    count: u64,
}

/// Train a BPE vocabulary on `texts` (each a line or document).
pub fn train_bpe<'a>(
    texts: impl IntoIterator<Item = &'a str>,
    options: &TrainOptions,
) -> Result<Tokenizer> {
    if options.vocab_size <= N_RESERVED {
        return Err(Error::Invalid(format!(
            "tokenizer training: vocab_size {} leaves no room for pieces; it must exceed \
             {N_RESERVED} (3 control + 256 byte tokens)",
            options.vocab_size
        )));
    }
    if !(options.character_coverage > 0.0 && options.character_coverage <= 1.0) {
        return Err(Error::Invalid(format!(
            "tokenizer training: character_coverage {} must be in (0, 1]",
            options.character_coverage
        )));
    }
    let texts: Vec<&str> = texts.into_iter().collect();
    let word_counts = count_words(&texts);

    let alphabet = choose_alphabet(&word_counts, options);
    let mut pieces: Vec<Vec<u8>> = vec![b"<unk>".to_vec(), b"<s>".to_vec(), b"</s>".to_vec()];
    pieces.extend((0..=255u8).map(byte_piece));
    let mut piece_chars: Vec<usize> = vec![1; pieces.len()];
    let mut char_id: HashMap<char, u32> = HashMap::new();
    for &ch in &alphabet {
        char_id.insert(ch, pieces.len() as u32);
        pieces.push(ch.to_string().into_bytes());
        piece_chars.push(1);
    }
    let n_chars = alphabet.len();

    let mut words: Vec<Word> = word_counts
        .into_iter()
        .map(|(word, count)| Word {
            symbols: word
                .chars()
                .map(|ch| char_id.get(&ch).copied().unwrap_or(BARRIER))
                .collect(),
            count,
        })
        .collect();
    // Deterministic order regardless of hash-map iteration.
    words.sort_unstable_by(|a, b| a.symbols.cmp(&b.symbols));

    let mut pair_counts: HashMap<Pair, u64> = HashMap::new();
    let mut pair_words: HashMap<Pair, Vec<u32>> = HashMap::new();
    for (word_idx, word) in words.iter().enumerate() {
        for pair in pairs(&word.symbols) {
            *pair_counts.entry(pair).or_default() += word.count;
            pair_words.entry(pair).or_default().push(word_idx as u32);
        }
    }
    let mut heap: BinaryHeap<(u64, Reverse<Pair>)> = pair_counts
        .iter()
        .map(|(&pair, &count)| (count, Reverse(pair)))
        .collect();

    let mut index: HashMap<Vec<u8>, u32> = pieces
        .iter()
        .enumerate()
        .map(|(id, p)| (p.clone(), id as u32))
        .collect();
    let mut blocked: HashSet<Pair> = HashSet::new();
    let mut n_merges = 0usize;
    while pieces.len() < options.vocab_size {
        let Some((count, Reverse(pair))) = heap.pop() else {
            break;
        };
        let current = pair_counts.get(&pair).copied().unwrap_or(0);
        if current != count {
            if current > 0 {
                heap.push((current, Reverse(pair)));
            }
            continue;
        }
        if blocked.contains(&pair) {
            continue;
        }
        let (left, right) = pair;
        let mut merged = pieces[left as usize].clone();
        merged.extend_from_slice(&pieces[right as usize]);
        let too_long =
            piece_chars[left as usize] + piece_chars[right as usize] > options.max_piece_chars;
        let reserved_look = parse_byte_piece(&merged).is_some()
            || matches!(&merged[..], b"<unk>" | b"<s>" | b"</s>");
        if too_long || reserved_look {
            blocked.insert(pair);
            continue;
        }
        let merged_id = match index.get(&merged) {
            Some(&id) => id,
            None => {
                let id = pieces.len() as u32;
                index.insert(merged.clone(), id);
                piece_chars.push(piece_chars[left as usize] + piece_chars[right as usize]);
                pieces.push(merged);
                n_merges += 1;
                id
            }
        };
        apply_merge(
            pair,
            merged_id,
            &mut words,
            &mut pair_counts,
            &mut pair_words,
            &mut heap,
        );
    }

    let mut scores = vec![NO_MERGE_SCORE; N_RESERVED];
    scores.extend((0..n_chars).map(|i| -((n_merges + i) as f32)));
    scores.extend((0..n_merges).map(|rank| -(rank as f32)));
    debug_assert_eq!(scores.len(), pieces.len());
    debug_assert_eq!(pieces[BYTE_OFFSET as usize], b"<0x00>");
    Tokenizer::new(pieces, scores)
}

/// Adjacent symbol pairs of a word, skipping barriers.
fn pairs(symbols: &[u32]) -> impl Iterator<Item = Pair> + '_ {
    symbols
        .windows(2)
        .map(|w| (w[0], w[1]))
        .filter(|&(a, b)| a != BARRIER && b != BARRIER)
}

/// Replace every non-overlapping occurrence (left to right) of `pair` with
/// `merged_id` in the words that contain it, updating the pair statistics.
fn apply_merge(
    pair: Pair,
    merged_id: u32,
    words: &mut [Word],
    pair_counts: &mut HashMap<Pair, u64>,
    pair_words: &mut HashMap<Pair, Vec<u32>>,
    heap: &mut BinaryHeap<(u64, Reverse<Pair>)>,
) {
    let mut word_ids = pair_words.remove(&pair).unwrap_or_default();
    word_ids.sort_unstable();
    word_ids.dedup();
    let mut delta: HashMap<Pair, i64> = HashMap::new();
    let mut merged_symbols = Vec::new();
    for &word_idx in &word_ids {
        let word = &mut words[word_idx as usize];
        let symbols = &word.symbols;
        if !symbols.windows(2).any(|w| (w[0], w[1]) == pair) {
            continue;
        }
        merged_symbols.clear();
        let mut i = 0;
        while i < symbols.len() {
            if i + 1 < symbols.len() && (symbols[i], symbols[i + 1]) == pair {
                merged_symbols.push(merged_id);
                i += 2;
            } else {
                merged_symbols.push(symbols[i]);
                i += 1;
            }
        }
        let count = word.count as i64;
        for old in pairs(symbols) {
            *delta.entry(old).or_default() -= count;
        }
        for new in pairs(&merged_symbols) {
            *delta.entry(new).or_default() += count;
            if new.0 == merged_id || new.1 == merged_id {
                pair_words.entry(new).or_default().push(word_idx);
            }
        }
        std::mem::swap(&mut word.symbols, &mut merged_symbols);
    }
    // Lower counts leave a stale heap entry behind; it is re-pushed when popped.
    for (changed, d) in delta {
        let entry = pair_counts.entry(changed).or_default();
        *entry = (*entry as i64 + d) as u64;
        if *entry == 0 {
            pair_counts.remove(&changed);
        } else if d > 0 {
            heap.push((*entry, Reverse(changed)));
        }
    }
}

/// Split `text` into SentencePiece-style words (see the module doc) and count them.
fn count_words(texts: &[&str]) -> HashMap<String, u64> {
    texts
        .par_iter()
        .fold(HashMap::new, |mut counts: HashMap<String, u64>, text| {
            for_each_word(text, |word| match counts.get_mut(word) {
                Some(c) => *c += 1,
                None => {
                    counts.insert(word.to_string(), 1);
                }
            });
            counts
        })
        .reduce(HashMap::new, |a, b| {
            // Fold the smaller map into the larger one.
            if a.len() >= b.len() {
                merge_counts(a, b)
            } else {
                merge_counts(b, a)
            }
        })
}

fn merge_counts(
    mut into: HashMap<String, u64>,
    from: HashMap<String, u64>,
) -> HashMap<String, u64> {
    for (word, c) in from {
        *into.entry(word).or_default() += c;
    }
    into
}

/// Call `f` with each word of `text`: `" first"`, `" word"`, `"\n"`, `"next"`, ...
pub(crate) fn for_each_word(text: &str, mut f: impl FnMut(&str)) {
    if text.is_empty() {
        return;
    }
    let mut word = String::from(" ");
    for ch in text.chars() {
        match ch {
            ' ' => {
                if !word.is_empty() {
                    f(&word);
                }
                word.clear();
                word.push(' ');
            }
            '\n' | '\r' => {
                if !word.is_empty() {
                    f(&word);
                }
                word.clear();
                f(ch.encode_utf8(&mut [0; 4]));
            }
            _ => word.push(ch),
        }
    }
    if !word.is_empty() {
        f(&word);
    }
}

/// The single-character pieces: most frequent first until the coverage is met,
/// always including the space, capped by the vocabulary budget.
fn choose_alphabet(word_counts: &HashMap<String, u64>, options: &TrainOptions) -> Vec<char> {
    let mut char_counts: HashMap<char, u64> = HashMap::new();
    for (word, &count) in word_counts {
        for ch in word.chars() {
            *char_counts.entry(ch).or_default() += count;
        }
    }
    let total: u64 = char_counts.values().sum();
    let mut by_frequency: Vec<(char, u64)> = char_counts.into_iter().collect();
    by_frequency.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let budget = options.vocab_size - N_RESERVED;
    let mut alphabet = vec![' '];
    let mut covered = 0u64;
    for (ch, count) in by_frequency {
        if alphabet.len() >= budget || covered as f64 >= options.character_coverage * total as f64 {
            break;
        }
        covered += count;
        if ch != ' ' {
            alphabet.push(ch);
        }
    }
    alphabet
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_carry_their_leading_space_and_newlines_stand_alone() {
        let mut words = Vec::new();
        for_each_word("a  bc\nd", |w| words.push(w.to_string()));
        assert_eq!(words, [" a", " ", " bc", "\n", "d"]);
    }
}
