//! The odds-ratio term in isolation against `loss-vectors.json` (float64, including lp near 0
//! where a naive log(1 - exp) loses everything), and the worked two-pair batch.

mod common;

use common::*;
use orpo::train::loss::{odds_term, Metrics};
use serde_json::Value;

fn load() -> Value {
    let p = fixtures().join("golden/loss-vectors.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn odds_term_values_and_derivatives() {
    let v = load();
    let beta = v["beta"].as_f64().unwrap();
    for (i, c) in v["cases"].as_array().unwrap().iter().enumerate() {
        let w = c["lp_chosen"].as_f64().unwrap();
        let l = c["lp_rejected"].as_f64().unwrap();
        let t = odds_term(&[w], &[l], beta);
        let f = |k: &str| c[k].as_f64().unwrap();
        assert_close(&format!("case {i} z"), t.z[0], f("z"), 1e-9, 1e-12);
        assert_close(
            &format!("case {i} logsigmoid"),
            t.log_sigmoid_z[0],
            f("logsigmoid_z"),
            1e-9,
            1e-15,
        );
        assert_close(
            &format!("case {i} odds_term"),
            t.value,
            f("odds_term"),
            1e-9,
            1e-16,
        );
        assert_close(
            &format!("case {i} d/dw"),
            t.d_chosen[0],
            f("d_odds_term_d_lp_chosen"),
            1e-6,
            1e-12,
        );
        assert_close(
            &format!("case {i} d/dl"),
            t.d_rejected[0],
            f("d_odds_term_d_lp_rejected"),
            1e-6,
            1e-12,
        );
    }
}

#[test]
fn worked_batch() {
    let v = load();
    let b = &v["batch"];
    let beta = v["beta"].as_f64().unwrap();
    let rows = |k: &str| -> Vec<Vec<f64>> {
        b[k].as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            })
            .collect()
    };
    let mean = |r: &Vec<f64>| r.iter().sum::<f64>() / r.len() as f64;
    let targets = rows("chosen_target_logps");
    let n: usize = targets.iter().map(Vec::len).sum();
    let nll = -targets.iter().flatten().sum::<f64>() / n as f64;
    let lp_w: Vec<f64> = rows("chosen_answer_logps").iter().map(mean).collect();
    let lp_l: Vec<f64> = rows("rejected_answer_logps").iter().map(mean).collect();
    let (m, _) = Metrics::from_parts(&lp_w, &lp_l, beta, nll, 0.0, 0.0);
    let f = |k: &str| b[k].as_f64().unwrap();
    assert_close("nll", m.get("nll_loss").unwrap(), f("nll_loss"), 1e-12, 0.0);
    assert_close("loss", m.loss, f("loss"), 1e-12, 0.0);
    assert_close(
        "log_odds_chosen",
        m.get("log_odds_chosen").unwrap(),
        f("log_odds_chosen"),
        1e-12,
        0.0,
    );
    assert_close(
        "log_odds_ratio",
        m.get("log_odds_ratio").unwrap(),
        f("log_odds_ratio"),
        1e-12,
        0.0,
    );
    assert_close(
        "rewards/chosen",
        m.get("rewards/chosen").unwrap(),
        f("rewards_chosen"),
        1e-12,
        0.0,
    );
    assert_close(
        "rewards/rejected",
        m.get("rewards/rejected").unwrap(),
        f("rewards_rejected"),
        1e-12,
        0.0,
    );
    assert_close(
        "rewards/margins",
        m.get("rewards/margins").unwrap(),
        f("rewards_margins"),
        1e-12,
        1e-15,
    );
    assert_close(
        "rewards/accuracies",
        m.get("rewards/accuracies").unwrap(),
        f("rewards_accuracies"),
        0.0,
        0.0,
    );
}
