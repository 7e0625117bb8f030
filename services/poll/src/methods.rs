//! Ranked-choice results: instant runoff (round by round) and the Condorcet comparison, computed
//! from a ranked poll's aggregated ballots. Pure functions: no I/O.
//!
//! Options are the indices `0..n`. A ranking lists distinct option indices, best first; it may be
//! partial: the options it leaves out are below all those it ranks and equal among themselves.
//! Ballots come aggregated, as `(ranking, how many ballots had exactly that ranking)`; the same
//! ranking may appear more than once (the counts add up). Every computation works on the distinct
//! rankings with their counts, never ballot by ballot: instant runoff costs
//! O(rounds × distinct rankings × n) and the pairwise matrix O(distinct rankings × n²), whatever
//! the number of ballots.
//!
//! # Instant runoff
//!
//! Each round, every ballot counts for its highest-ranked option still in the race; a ballot whose
//! every ranked option has been eliminated is exhausted. An option with a strict majority of the
//! round's ballots that are not exhausted wins, and so does the last option left; that round is the
//! last. Otherwise the option with the fewest votes in the round is eliminated (one per round, also
//! when several have no votes at all) and another round follows.
//!
//! Tie rule: when several options tie for the fewest votes in a round, the one eliminated is the
//! one among them with the fewest votes in the previous round; if several tie there too, the one
//! among those with the fewest votes in the round before that, and so on back to the first round
//! (backwards tie-breaking); if several are still tied after the first round, the one listed last
//! among the poll's options (the highest index) is eliminated.
//!
//! If every ballot were exhausted while several options remain, eliminations would go on by the
//! same rule until one option is left, which wins. With at least one ballot this cannot happen (an
//! option in the race never loses votes, and the one eliminated has the fewest), so the winner is
//! `None` only when there are no ballots, and then there are no rounds.
//!
//! # Condorcet
//!
//! `pairwise[a][b]` counts the ballots that prefer `a` to `b`: those that rank `a` and rank `b`
//! lower or not at all. The Condorcet winner is the option that beats every other one head to head
//! (`pairwise[a][b] > pairwise[b][a]` for every other `b`); there may be none.
//!
//! Inputs are assumed valid (indices below `n`, distinct within a ranking); anyway, option indices
//! of `n` or more and repeats of an option within a ranking are ignored, and a ballot that ranks no
//! option (once those are dropped) is not counted at all.

use std::collections::BTreeMap;

/// One round of an instant runoff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Round {
    /// Votes per option this round, in option order; `None` for options eliminated in an earlier round.
    pub counts: Vec<Option<u64>>,
    /// Ballots whose every ranked option is eliminated (exhausted), as of this round.
    pub exhausted: u64,
    /// The option eliminated at the end of this round (None in the last round).
    pub eliminated: Option<u32>,
}

/// The ranked-choice results of a poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ranked {
    /// Instant-runoff winner (None when there are no ballots).
    pub winner: Option<u32>,
    pub rounds: Vec<Round>,
    /// The option that beats every other one head to head (strictly more ballots rank it above the other than the reverse), if any.
    pub condorcet_winner: Option<u32>,
    /// pairwise[a][b] = ballots that prefer a over b (a ranked and b ranked lower or unranked). pairwise[a][a] = 0. n×n.
    pub pairwise: Vec<Vec<u64>>,
}

/// The instant-runoff rounds and winner, the pairwise matrix and the Condorcet winner of `n`
/// options from aggregated rankings (see the module documentation for the rules).
pub fn ranked(n: usize, rankings: &[(Vec<u32>, u64)]) -> Ranked {
    let ballots = aggregate(n, rankings);
    let total = ballots.iter().fold(0u64, |sum, (_, c)| sum.saturating_add(*c));
    let pairwise = pairwise(n, &ballots);
    if total == 0 {
        return Ranked {
            winner: None,
            rounds: Vec::new(),
            condorcet_winner: None,
            pairwise,
        };
    }
    let (winner, rounds) = instant_runoff(n, &ballots, total);
    Ranked {
        winner,
        rounds,
        condorcet_winner: condorcet_winner(&pairwise),
        pairwise,
    }
}

/// The distinct valid rankings (indices below `n`, first occurrence of each option kept) with
/// their summed counts, without empty rankings or zero counts.
fn aggregate(n: usize, rankings: &[(Vec<u32>, u64)]) -> Vec<(Vec<usize>, u64)> {
    let mut merged: BTreeMap<Vec<usize>, u64> = BTreeMap::new();
    let mut seen = vec![false; n];
    for (ranking, count) in rankings {
        if *count == 0 {
            continue;
        }
        seen.iter_mut().for_each(|s| *s = false);
        let mut clean = Vec::with_capacity(ranking.len().min(n));
        for &o in ranking {
            let o = o as usize;
            if let Some(s) = seen.get_mut(o)
                && !*s
            {
                *s = true;
                clean.push(o);
            }
        }
        if clean.is_empty() {
            continue;
        }
        let entry = merged.entry(clean).or_default();
        *entry = entry.saturating_add(*count);
    }
    merged.into_iter().collect()
}

/// Runs the instant runoff over at least one ballot (`total > 0`).
fn instant_runoff(n: usize, ballots: &[(Vec<usize>, u64)], total: u64) -> (Option<u32>, Vec<Round>) {
    let mut continuing = vec![true; n];
    let mut left = n;
    // Every round's votes per option (0 for the eliminated ones), for the tie rule.
    let mut history: Vec<Vec<u64>> = Vec::new();
    let mut rounds = Vec::new();
    while left > 0 {
        let mut counts = vec![0u64; n];
        let mut exhausted = 0u64;
        for (ranking, c) in ballots {
            match ranking.iter().find(|&&o| continuing[o]) {
                Some(&o) => counts[o] = counts[o].saturating_add(*c),
                None => exhausted = exhausted.saturating_add(*c),
            }
        }
        let active = total.saturating_sub(exhausted);
        let shown = (0..n).map(|o| continuing[o].then_some(counts[o])).collect();
        // A strict majority, 2 × count > active, written so as not to overflow.
        let majority = (0..n).find(|&o| continuing[o] && counts[o] > active - counts[o].min(active));
        let last = if left == 1 {
            (0..n).find(|&o| continuing[o])
        } else {
            None
        };
        if let Some(winner) = majority.or(last) {
            rounds.push(Round {
                counts: shown,
                exhausted,
                eliminated: None,
            });
            return (Some(index(winner)), rounds);
        }
        history.push(counts);
        let loser = loser(&continuing, &history);
        rounds.push(Round {
            counts: shown,
            exhausted,
            eliminated: loser.map(index),
        });
        match loser {
            Some(o) => {
                continuing[o] = false;
                left -= 1;
            }
            None => break,
        }
    }
    (None, rounds)
}

/// The option to eliminate after the last round of `history`: the fewest votes in that round, ties
/// broken by the rounds before it, latest first, then by the highest index.
fn loser(continuing: &[bool], history: &[Vec<u64>]) -> Option<usize> {
    let mut tied: Vec<usize> = (0..continuing.len()).filter(|&o| continuing[o]).collect();
    for round in history.iter().rev() {
        let fewest = tied.iter().map(|&o| round[o]).min()?;
        tied.retain(|&o| round[o] == fewest);
        if tied.len() == 1 {
            break;
        }
    }
    tied.last().copied()
}

/// `pairwise[a][b]`: the ballots that rank `a` above `b` (`b` lower or unranked).
fn pairwise(n: usize, ballots: &[(Vec<usize>, u64)]) -> Vec<Vec<u64>> {
    let mut matrix = vec![vec![0u64; n]; n];
    let mut above = vec![false; n];
    for (ranking, c) in ballots {
        above.iter_mut().for_each(|s| *s = false);
        for &a in ranking {
            above[a] = true;
            for (b, cell) in matrix[a].iter_mut().enumerate() {
                if !above[b] {
                    *cell = cell.saturating_add(*c);
                }
            }
        }
    }
    matrix
}

/// The option that beats every other one head to head, if any.
fn condorcet_winner(pairwise: &[Vec<u64>]) -> Option<u32> {
    let beats = |a: usize, b: usize| pairwise[a][b] > pairwise[b][a];
    (0..pairwise.len())
        .find(|&a| (0..pairwise.len()).all(|b| b == a || beats(a, b)))
        .map(index)
}

fn index(o: usize) -> u32 {
    u32::try_from(o).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use std::cmp::Reverse;
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn round(counts: &[Option<u64>], exhausted: u64, eliminated: Option<u32>) -> Round {
        Round {
            counts: counts.to_vec(),
            exhausted,
            eliminated,
        }
    }

    // Tennessee's capital (the Wikipedia example of the Condorcet method and of instant runoff).
    const MEMPHIS: u32 = 0;
    const NASHVILLE: u32 = 1;
    const CHATTANOOGA: u32 = 2;
    const KNOXVILLE: u32 = 3;

    fn tennessee(scale: u64) -> Vec<(Vec<u32>, u64)> {
        vec![
            (vec![MEMPHIS, NASHVILLE, CHATTANOOGA, KNOXVILLE], 42 * scale),
            (vec![NASHVILLE, CHATTANOOGA, KNOXVILLE, MEMPHIS], 26 * scale),
            (vec![CHATTANOOGA, KNOXVILLE, NASHVILLE, MEMPHIS], 15 * scale),
            (vec![KNOXVILLE, CHATTANOOGA, NASHVILLE, MEMPHIS], 17 * scale),
        ]
    }

    #[test]
    fn tennessee_capital_irv_elects_knoxville_condorcet_nashville() {
        let r = ranked(4, &tennessee(1));
        assert_eq!(
            r.rounds,
            vec![
                round(&[Some(42), Some(26), Some(15), Some(17)], 0, Some(CHATTANOOGA)),
                round(&[Some(42), Some(26), None, Some(32)], 0, Some(NASHVILLE)),
                round(&[Some(42), None, None, Some(58)], 0, None),
            ]
        );
        assert_eq!(r.winner, Some(KNOXVILLE));
        assert_eq!(r.condorcet_winner, Some(NASHVILLE));
        let (m, n, c, k) = (0, 1, 2, 3);
        assert_eq!((r.pairwise[n][m], r.pairwise[m][n]), (58, 42));
        assert_eq!((r.pairwise[n][c], r.pairwise[c][n]), (68, 32));
        assert_eq!((r.pairwise[n][k], r.pairwise[k][n]), (68, 32));
        assert_eq!((r.pairwise[c][k], r.pairwise[k][c]), (83, 17));
        assert_eq!(
            r.pairwise,
            vec![
                vec![0, 42, 42, 42],
                vec![58, 0, 68, 68],
                vec![58, 32, 0, 83],
                vec![58, 32, 17, 0],
            ]
        );
    }

    #[test]
    fn counts_are_multiplied_not_walked() {
        // A billion times the Tennessee electorate: same outcome, scaled counts, computed at once.
        let scale = 1_000_000_000;
        let r = ranked(4, &tennessee(scale));
        assert_eq!(r.winner, Some(KNOXVILLE));
        assert_eq!(r.condorcet_winner, Some(NASHVILLE));
        assert_eq!(r.rounds[2].counts, vec![Some(42 * scale), None, None, Some(58 * scale)]);
        assert_eq!(r.pairwise[1][0], 58 * scale);
    }

    #[test]
    fn condorcet_paradox_has_no_condorcet_winner_and_the_tie_rule_decides() {
        // Condorcet's paradox: A > B > C, B > C > A, C > A > B, one voter each.
        let (a, b, c) = (0, 1, 2);
        let r = ranked(3, &[(vec![a, b, c], 1), (vec![b, c, a], 1), (vec![c, a, b], 1)]);
        assert_eq!(r.condorcet_winner, None);
        let (a, b, c) = (a as usize, b as usize, c as usize);
        // Each beats the next 2 to 1, around the cycle.
        assert_eq!((r.pairwise[a][b], r.pairwise[b][a]), (2, 1));
        assert_eq!((r.pairwise[b][c], r.pairwise[c][b]), (2, 1));
        assert_eq!((r.pairwise[c][a], r.pairwise[a][c]), (2, 1));
        // Round 1 is a three-way tie with no earlier round to look back to: C, listed last, goes.
        // Its ballot moves on to A, who then has 2 of 3.
        assert_eq!(
            r.rounds,
            vec![
                round(&[Some(1), Some(1), Some(1)], 0, Some(2)),
                round(&[Some(2), Some(1), None], 0, None),
            ]
        );
        assert_eq!(r.winner, Some(0));
        // Listing the options in another order changes who is listed last, hence the outcome.
        let (a, b, c) = (2, 1, 0);
        let r = ranked(3, &[(vec![a, b, c], 1), (vec![b, c, a], 1), (vec![c, a, b], 1)]);
        assert_eq!(r.rounds[0].eliminated, Some(a));
        assert_eq!(r.winner, Some(b), "A's ballot goes to B");
    }

    #[test]
    fn backwards_tie_breaking_looks_at_the_previous_round() {
        // Round 1: A 10, B 5, C 6, D 1: D goes, its ballot to B. Round 2: B and C tie at 6, but B
        // had fewer in round 1, so B goes, although C is listed after it.
        let (a, b, c, d) = (0, 1, 2, 3);
        let r = ranked(4, &[(vec![a], 10), (vec![b, a], 5), (vec![c], 6), (vec![d, b, c], 1)]);
        assert_eq!(
            r.rounds,
            vec![
                round(&[Some(10), Some(5), Some(6), Some(1)], 0, Some(d)),
                round(&[Some(10), Some(6), Some(6), None], 0, Some(b)),
                round(&[Some(15), None, Some(7), None], 0, None),
            ]
        );
        assert_eq!(r.winner, Some(a));
    }

    #[test]
    fn backwards_tie_breaking_goes_back_to_the_first_round() {
        // X and Y tie in round 3 (5 each) and in round 2 (4 each); round 1 (3 against 4) decides
        // that X goes, although Y is listed after it.
        let (a, x, y, d, e) = (0, 1, 2, 3, 4);
        let r = ranked(
            5,
            &[
                (vec![a], 10),
                (vec![x], 3),
                (vec![y], 4),
                (vec![d, x], 1),
                (vec![e, x], 1),
                (vec![e, y], 1),
            ],
        );
        assert_eq!(
            r.rounds,
            vec![
                round(&[Some(10), Some(3), Some(4), Some(1), Some(2)], 0, Some(d)),
                round(&[Some(10), Some(4), Some(4), None, Some(2)], 0, Some(e)),
                round(&[Some(10), Some(5), Some(5), None, None], 0, Some(x)),
                // X's five ballots rank nothing else still in the race: exhausted.
                round(&[Some(10), None, Some(5), None, None], 5, None),
            ]
        );
        assert_eq!(r.winner, Some(a));
    }

    #[test]
    fn last_listed_breaks_a_tie_that_held_in_every_round() {
        // B and C have 2 votes in both rounds: C, listed last, goes.
        let (a, b, c, d) = (0, 1, 2, 3);
        let r = ranked(4, &[(vec![a], 4), (vec![b], 2), (vec![c], 2), (vec![d], 1)]);
        assert_eq!(
            r.rounds,
            vec![
                round(&[Some(4), Some(2), Some(2), Some(1)], 0, Some(d)),
                round(&[Some(4), Some(2), Some(2), None], 1, Some(c)),
                // 4 of the 6 ballots still in play: a majority.
                round(&[Some(4), Some(2), None, None], 3, None),
            ]
        );
        assert_eq!(r.winner, Some(a));
        // Options without votes go one per round, the last listed first.
        let r = ranked(3, &[(vec![1], 1)]);
        assert_eq!(r.rounds, vec![round(&[Some(0), Some(1), Some(0)], 0, None)]);
        let r = ranked(4, &[(vec![0], 2), (vec![3], 2)]);
        assert_eq!(
            r.rounds.iter().map(|r| r.eliminated).collect::<Vec<_>>(),
            vec![Some(2), Some(1), Some(3), None]
        );
        assert_eq!(r.winner, Some(0));
    }

    #[test]
    fn partial_rankings_and_exhausted_ballots() {
        let (a, b, c) = (0, 1, 2);
        let r = ranked(3, &[(vec![a], 4), (vec![b, a], 3), (vec![c], 2), (vec![c, b], 1)]);
        assert_eq!(
            r.rounds,
            vec![
                // B and C tie at 3 with no earlier round: C (listed last) goes.
                round(&[Some(4), Some(3), Some(3)], 0, Some(c)),
                // [C] is exhausted, [C, B] moves to B; A and B tie at 4, B had fewer in round 1.
                round(&[Some(4), Some(4), None], 2, Some(b)),
                round(&[Some(7), None, None], 3, None),
            ]
        );
        assert_eq!(r.winner, Some(a));
        let (a, b, c) = (0, 1, 2);
        // An unranked option is below every ranked one: [A] prefers A to B and to C.
        assert_eq!((r.pairwise[a][b], r.pairwise[b][a]), (4, 4));
        assert_eq!((r.pairwise[a][c], r.pairwise[c][a]), (7, 3));
        assert_eq!((r.pairwise[b][c], r.pairwise[c][b]), (3, 3));
        assert_eq!(r.condorcet_winner, None, "A and B tie head to head");
    }

    #[test]
    fn repeated_rankings_add_up_and_odd_input_does_not_panic() {
        let once = ranked(3, &[(vec![0, 1], 3), (vec![2], 2)]);
        let split = ranked(3, &[(vec![0, 1], 1), (vec![2], 2), (vec![0, 1], 2), (vec![1], 0)]);
        assert_eq!(once, split);

        let empty = ranked(3, &[]);
        assert_eq!(
            empty,
            Ranked {
                winner: None,
                rounds: Vec::new(),
                condorcet_winner: None,
                pairwise: vec![vec![0; 3]; 3],
            }
        );
        assert_eq!(ranked(3, &[(vec![0], 0)]), empty);
        assert_eq!(ranked(0, &[(vec![0], 4)]).winner, None);
        let one = ranked(1, &[(vec![0], 4)]);
        assert_eq!((one.winner, one.condorcet_winner), (Some(0), Some(0)));
        assert_eq!(one.rounds, vec![round(&[Some(4)], 0, None)]);
        // Out-of-range indices and repeats are dropped; a ranking left empty is no ballot.
        let odd = ranked(3, &[(vec![7, 0, 0, 1, 99], 3), (vec![5], 2), (vec![2, u32::MAX], 2)]);
        assert_eq!(odd, ranked(3, &[(vec![0, 1], 3), (vec![2], 2)]));
        // Sums past u64::MAX saturate rather than overflow.
        let huge = ranked(2, &[(vec![0], u64::MAX), (vec![1], u64::MAX), (vec![0, 1], 1)]);
        assert!(huge.winner.is_some());
    }

    /// The rules again, ballot by ballot, as directly as they read.
    fn naive(n: usize, ballots: &[Vec<u32>]) -> Ranked {
        let mut pairwise = vec![vec![0u64; n]; n];
        for ballot in ballots {
            let position = |o: usize| ballot.iter().position(|&x| x as usize == o);
            for (a, row) in pairwise.iter_mut().enumerate() {
                for (b, cell) in row.iter_mut().enumerate() {
                    let prefers = match (position(a), position(b)) {
                        (Some(pa), Some(pb)) => pa < pb,
                        (Some(_), None) => true,
                        (None, _) => false,
                    };
                    if a != b && prefers {
                        *cell += 1;
                    }
                }
            }
        }
        if ballots.is_empty() {
            return Ranked {
                winner: None,
                rounds: Vec::new(),
                condorcet_winner: None,
                pairwise,
            };
        }
        let condorcet_winner = (0..n)
            .find(|&a| (0..n).filter(|&b| b != a).all(|b| pairwise[a][b] > pairwise[b][a]))
            .map(|a| a as u32);

        let mut out = vec![false; n];
        let mut history: Vec<Vec<u64>> = Vec::new();
        let mut rounds = Vec::new();
        let winner = loop {
            let mut votes = vec![0u64; n];
            let mut exhausted = 0;
            for ballot in ballots {
                match ballot.iter().find(|&&o| !out[o as usize]) {
                    Some(&o) => votes[o as usize] += 1,
                    None => exhausted += 1,
                }
            }
            let active = ballots.len() as u64 - exhausted;
            let counts: Vec<Option<u64>> = (0..n).map(|o| if out[o] { None } else { Some(votes[o]) }).collect();
            let continuing: Vec<usize> = (0..n).filter(|&o| !out[o]).collect();
            history.push(votes.clone());
            let won = if continuing.len() == 1 {
                Some(continuing[0])
            } else {
                continuing.iter().copied().find(|&o| 2 * votes[o] > active)
            };
            if let Some(w) = won {
                rounds.push(Round {
                    counts,
                    exhausted,
                    eliminated: None,
                });
                break Some(w as u32);
            }
            // Fewest this round, then the previous round, ... back to round 1; then listed last.
            let key = |o: usize| (history.iter().rev().map(|h| h[o]).collect::<Vec<_>>(), Reverse(o));
            let loser = continuing
                .iter()
                .copied()
                .min_by_key(|&o| key(o))
                .expect("two options left");
            out[loser] = true;
            rounds.push(Round {
                counts,
                exhausted,
                eliminated: Some(loser as u32),
            });
        };
        Ranked {
            winner,
            rounds,
            condorcet_winner,
            pairwise,
        }
    }

    /// `n` options and up to 40 ballots, each a random partial ranking of them.
    fn election() -> impl Strategy<Value = (usize, Vec<Vec<u32>>)> {
        (2usize..=6).prop_flat_map(|n| {
            let ballot = (Just((0..n as u32).collect::<Vec<u32>>()).prop_shuffle(), 1..=n)
                .prop_map(|(order, len)| order[..len].to_vec());
            (Just(n), prop::collection::vec(ballot, 0..=40))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn matches_naive_ballot_by_ballot((n, ballots) in election(), split in 1u64..4) {
            let mut aggregated: BTreeMap<Vec<u32>, u64> = BTreeMap::new();
            for b in &ballots {
                *aggregated.entry(b.clone()).or_default() += 1;
            }
            let aggregated: Vec<(Vec<u32>, u64)> = aggregated.into_iter().collect();
            let one_each: Vec<(Vec<u32>, u64)> = ballots.iter().map(|b| (b.clone(), 1)).collect();
            // The same ballots again, each ranking's count cut into pieces listed apart.
            let mut pieces: Vec<(Vec<u32>, u64)> = Vec::new();
            for part in 0..split {
                for (r, c) in &aggregated {
                    let piece = c / split + u64::from(part < c % split);
                    pieces.push((r.clone(), piece));
                }
            }

            let got = ranked(n, &aggregated);
            prop_assert_eq!(&got, &naive(n, &ballots));
            prop_assert_eq!(&got, &ranked(n, &one_each));
            prop_assert_eq!(&got, &ranked(n, &pieces));

            let total = ballots.len() as u64;
            for r in &got.rounds {
                prop_assert_eq!(r.counts.iter().flatten().sum::<u64>() + r.exhausted, total);
            }
            prop_assert_eq!(got.winner.is_none(), ballots.is_empty());
            prop_assert!(got.rounds.len() <= n);
            for (i, r) in got.rounds.iter().enumerate() {
                prop_assert_eq!(r.eliminated.is_none(), i + 1 == got.rounds.len());
            }
        }
    }
}
