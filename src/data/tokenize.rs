//! TRL's ORPO `tokenize_row` / `build_tokenized_answer`, plus the prompt truncation of the SPEC.

use super::error::SkipReason;
use super::tokenizer::Tokenizer;
use super::{DataOptions, PairText, TokenizedPair};

/// Label value of positions that do not count in the loss.
pub const IGNORE_INDEX: i64 = -100;

/// One answer, split at the prompt boundary as `build_tokenized_answer` does.
struct Answer {
    prompt: Vec<u32>,
    answer: Vec<u32>,
}

/// `enc(prompt + answer)` split so that a token merged across the boundary goes to the answer.
fn build_answer(prompt_ids: &[u32], full: Vec<u32>) -> Result<Answer, SkipReason> {
    // TRL checks len(enc(prompt)) + len(full[len(prompt):]) == len(full).
    if full.len() < prompt_ids.len() {
        return Err(SkipReason::PromptMismatch);
    }
    let mut start = prompt_ids.len();
    if prompt_ids != &full[..start] {
        start -= 1;
    }
    let mut prompt = full;
    let answer = prompt.split_off(start);
    Ok(Answer { prompt, answer })
}

/// Cuts a prompt to `max` tokens keeping its end, and its leading BOS if it has one.
fn keep_end(ids: &mut Vec<u32>, max: usize, bos: Option<u32>) -> bool {
    if ids.len() <= max {
        return false;
    }
    let has_bos = bos.is_some() && ids.first().copied() == bos;
    let mut cut: Vec<u32> = Vec::with_capacity(max);
    if has_bos && max > 0 {
        cut.push(ids[0]);
        cut.extend_from_slice(&ids[ids.len() - (max - 1)..]);
    } else {
        cut.extend_from_slice(&ids[ids.len() - max..]);
    }
    *ids = cut;
    true
}

/// Tokenizes one pair exactly as TRL 1.16's ORPO `tokenize_row`, with the SPEC's truncation.
pub fn tokenize_pair(
    text: &PairText,
    tok: &Tokenizer,
    opts: &DataOptions,
) -> Result<TokenizedPair, SkipReason> {
    let enc = |s: &str| tok.encode(s).map_err(|_| SkipReason::EncodeFailed);
    let mut prompt_ids = enc(&text.prompt)?;
    let full_c = enc(&format!("{}{}", text.prompt, text.chosen))?;
    let full_r = enc(&format!("{}{}", text.prompt, text.rejected))?;
    let mut chosen = build_answer(&prompt_ids, full_c)?;
    let mut rejected = build_answer(&prompt_ids, full_r)?;

    // The prompt keeps only what both answers agree is prompt.
    let prompt_len = chosen.prompt.len().min(rejected.prompt.len());
    prompt_ids.truncate(prompt_len);
    let diff_tokens = chosen
        .prompt
        .iter()
        .zip(&rejected.prompt)
        .filter(|(a, b)| a != b)
        .count();
    if diff_tokens > 1 || chosen.prompt.len().abs_diff(rejected.prompt.len()) > 1 {
        return Err(SkipReason::PromptMismatch);
    }

    // BOS in front of every prompt that does not start with it.
    if let Some(bos) = tok.bos_id() {
        for ids in [&mut prompt_ids, &mut chosen.prompt, &mut rejected.prompt] {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
    }
    // EOS at the end of every answer that does not end with it.
    let eos = tok.eos_id();
    for a in [&mut chosen, &mut rejected] {
        if a.answer.last() != Some(&eos) {
            a.answer.push(eos);
        }
    }

    // Truncation: prompts first (keep end and BOS), then answers (keep start).
    let max_len = opts.max_length;
    let longer = chosen.answer.len().max(rejected.answer.len());
    let mut truncated = false;
    if chosen.prompt.len().max(rejected.prompt.len()) + longer > max_len {
        let bos = tok.bos_id();
        for ids in [&mut prompt_ids, &mut chosen.prompt, &mut rejected.prompt] {
            truncated |= keep_end(ids, opts.max_prompt_length, bos);
        }
    }
    for a in [&mut chosen, &mut rejected] {
        if a.prompt.len() >= max_len {
            return Err(SkipReason::PromptTooLong);
        }
        if a.prompt.len() + a.answer.len() > max_len {
            a.answer.truncate(max_len - a.prompt.len());
            truncated = true;
        }
        if a.answer.is_empty() {
            return Err(SkipReason::EmptyAnswer);
        }
    }

    let sequence = |a: &Answer| {
        let ids: Vec<u32> = a.prompt.iter().chain(&a.answer).copied().collect();
        let labels: Vec<i64> = std::iter::repeat_n(IGNORE_INDEX, a.prompt.len())
            .chain(a.answer.iter().map(|&t| t as i64))
            .collect();
        (ids, labels)
    };
    let (chosen_input_ids, chosen_labels) = sequence(&chosen);
    let (rejected_input_ids, rejected_labels) = sequence(&rejected);
    Ok(TokenizedPair {
        prompt_input_ids: prompt_ids,
        chosen_input_ids,
        chosen_labels,
        rejected_input_ids,
        rejected_labels,
        truncated,
        text: text.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_end_keeps_bos() {
        let mut v = vec![9, 1, 2, 3, 4, 5];
        assert!(keep_end(&mut v, 3, Some(9)));
        assert_eq!(v, vec![9, 4, 5]);
        let mut v = vec![1, 2, 3, 4, 5];
        assert!(keep_end(&mut v, 3, Some(9)));
        assert_eq!(v, vec![3, 4, 5]);
        let mut v = vec![1, 2];
        assert!(!keep_end(&mut v, 3, None));
        assert_eq!(v, vec![1, 2]);
    }

    #[test]
    fn merged_boundary_token_goes_to_answer() {
        let a = build_answer(&[1, 2, 3], vec![1, 2, 7, 8]).unwrap();
        assert_eq!(a.prompt, vec![1, 2]);
        assert_eq!(a.answer, vec![7, 8]);
        let a = build_answer(&[1, 2, 3], vec![1, 2, 3, 8]).unwrap();
        assert_eq!(a.prompt, vec![1, 2, 3]);
        assert_eq!(a.answer, vec![8]);
        assert!(build_answer(&[1, 2, 3], vec![1, 2]).is_err());
    }
}
