//! The built-in story corpus: determinism, size, format, and grammar statistics
//! computed here from the text (the expectations are rules of English spelling
//! and punctuation, not numbers copied from the generator).

use std::collections::HashMap;

use anemone::data::corpus::{CorpusConfig, SEPARATOR, WORDS_PER_STORY, generate, write_stories};

fn corpus(seed: u64, n_bytes: usize) -> String {
    generate(&CorpusConfig { seed, n_bytes })
}

fn stories(text: &str) -> Vec<&str> {
    assert!(text.ends_with('\n'), "corpus must end with a newline");
    text.trim_end_matches('\n').split(SEPARATOR).collect()
}

/// Lowercased words with surrounding punctuation removed ("Lily's" stays whole).
fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| !c.is_ascii_alphabetic())
                .to_ascii_lowercase()
        })
        .filter(|w| !w.is_empty())
}

#[test]
fn same_seed_same_bytes_different_seed_different_bytes() {
    let a = corpus(1, 50_000);
    assert_eq!(a, corpus(1, 50_000));
    let b = corpus(2, 50_000);
    assert_ne!(a, b);
    // Not just a shifted copy: the first stories differ.
    assert_ne!(stories(&a)[0], stories(&b)[0]);
}

#[test]
fn writer_produces_the_same_bytes_as_generate() {
    let cfg = CorpusConfig {
        seed: 5,
        n_bytes: 30_000,
    };
    let mut out = Vec::new();
    let written = write_stories(&cfg, &mut out).unwrap();
    assert_eq!(written, out.len());
    assert_eq!(out, generate(&cfg).into_bytes());
}

#[test]
fn size_is_an_upper_bound_within_one_story() {
    assert_eq!(corpus(3, 0), "");
    assert_eq!(corpus(3, 50), "", "no story is 50 bytes long");
    for n_bytes in [3_000, 10_000, 123_457] {
        let text = corpus(3, n_bytes);
        assert!(text.len() <= n_bytes, "{} > {n_bytes}", text.len());
        assert!(
            n_bytes - text.len() < 2_048,
            "{} bytes for a budget of {n_bytes}",
            text.len()
        );
    }
}

#[test]
fn format_stories_words_and_characters() {
    let text = corpus(11, 300_000);
    assert!(text.is_ascii());
    let stories = stories(&text);
    assert!(stories.len() > 200, "{} stories", stories.len());
    for story in &stories {
        assert!(!story.is_empty() && !story.contains('\n'), "{story:?}");
        let n_words = story.split_whitespace().count();
        assert!(
            WORDS_PER_STORY.contains(&n_words),
            "{n_words} words: {story}"
        );
        for bad in ["  ", " .", " ,", " !", " ?", "..", ",,", " '"] {
            assert!(!story.contains(bad), "{bad:?} in: {story}");
        }
    }
    // Lengths vary: not all stories are the same size.
    let mut lengths: Vec<usize> = stories
        .iter()
        .map(|s| s.split_whitespace().count())
        .collect();
    lengths.sort();
    assert!(lengths[lengths.len() * 9 / 10] - lengths[lengths.len() / 10] > 30);
}

/// The story with each quotation replaced by `Q` (the quotation continues the
/// sentence: `"Hi," said Tom.`) or `Q.` (it ends one: `Tom said, "Hi."`), after
/// checking each quotation's own sentences.
fn replace_quotes(story: &str) -> String {
    let parts: Vec<&str> = story.split('"').collect();
    assert!(parts.len() % 2 == 1, "unbalanced quotes: {story}");
    let mut out = String::new();
    for (i, part) in parts.iter().enumerate() {
        if i % 2 == 0 {
            out.push_str(part);
            continue;
        }
        let quote = *part;
        for sentence in split_sentences(quote) {
            assert!(
                sentence.starts_with(|c: char| c.is_ascii_uppercase()),
                "quoted sentence {sentence:?} must start uppercase: {story}"
            );
        }
        // A lowercase word after the quotation is a speech tag ("said Tom"); one
        // after a comma may also be a name ("Tom said"), so a comma never ends.
        let after = parts[i + 1].trim_start();
        let tag_follows = after.starts_with(|c: char| c.is_ascii_lowercase());
        let ends_sentence = quote.ends_with(['.', '!', '?']) && !tag_follows;
        out.push_str(if ends_sentence { "Q." } else { "Q" });
    }
    out
}

/// Sentences: split after `.`, `!` or `?` followed by a space.
fn split_sentences(text: &str) -> Vec<&str> {
    let mut sentences = Vec::new();
    let mut start = 0;
    let bytes = text.as_bytes();
    for i in 0..bytes.len() {
        let ends = matches!(bytes[i], b'.' | b'!' | b'?');
        if ends && bytes.get(i + 1).is_none_or(|&b| b == b' ') {
            sentences.push(text[start..=i].trim());
            start = i + 1;
        }
    }
    if !text[start..].trim().is_empty() {
        sentences.push(text[start..].trim());
    }
    sentences
}

#[test]
fn sentences_start_uppercase_end_with_punctuation_and_quotes_balance() {
    let text = corpus(12, 200_000);
    let mut n_sentences = 0;
    let mut n_quotes = 0;
    for story in stories(&text) {
        n_quotes += story.matches('"').count() / 2;
        let plain = replace_quotes(story);
        assert!(plain.ends_with(['.', '!', '?']), "{story}");
        for sentence in split_sentences(&plain) {
            n_sentences += 1;
            assert!(
                sentence.starts_with(|c: char| c.is_ascii_uppercase()),
                "sentence {sentence:?} must start uppercase: {story}"
            );
            assert!(sentence.ends_with(['.', '!', '?']), "{sentence:?}");
        }
    }
    assert!(
        n_sentences > 1000 && n_quotes > 200,
        "{n_sentences} {n_quotes}"
    );
}

#[test]
fn a_before_consonants_an_before_vowels() {
    let text = corpus(13, 300_000);
    let words: Vec<String> = words(&text).collect();
    let (mut n_a, mut n_an) = (0, 0);
    for pair in words.windows(2) {
        let vowel = pair[1].starts_with(['a', 'e', 'i', 'o', 'u']);
        match pair[0].as_str() {
            "a" => {
                n_a += 1;
                assert!(!vowel, "\"a {}\"", pair[1]);
            }
            "an" => {
                n_an += 1;
                assert!(vowel, "\"an {}\"", pair[1]);
            }
            _ => {}
        }
    }
    assert!(n_a > 1000 && n_an > 20, "a: {n_a}, an: {n_an}");
}

#[test]
fn vocabulary_is_small_and_distributed_like_english() {
    let text = corpus(14, 1_000_000);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for word in words(&text) {
        *counts.entry(word).or_default() += 1;
    }
    assert!(
        (250..=900).contains(&counts.len()),
        "{} distinct words",
        counts.len()
    );
    let mut by_count: Vec<(&String, &usize)> = counts.iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let top: Vec<&str> = by_count[..12].iter().map(|(w, _)| w.as_str()).collect();
    // Function words lead, as in any English text.
    for function_word in ["the", "and", "a"] {
        assert!(top.contains(&function_word), "top words: {top:?}");
    }
    // Past-tense narration: "was" and "said" are common.
    let total: usize = counts.values().sum();
    for word in ["was", "said", "he", "she", "they"] {
        let share = counts.get(word).copied().unwrap_or(0) as f64 / total as f64;
        assert!(share > 0.003, "{word}: {share}");
    }
}
