//! The Dormand-Prince 5(4) pair with first-same-as-last reuse and dense output.
//!
//! Tableau from Dormand and Prince (1980); the continuous extension is the one of Hairer, Norsett and
//! Wanner's DOPRI5 code (Solving ODEs I, Section II.6). With first-same-as-last, an accepted step costs
//! 6 evaluations: the seventh stage is v at the new point, which starts the next step.

use candle_core::Tensor;

use super::{combine, first_stage, shift, Dense, Rhs, Solver, Step};
use crate::error::Result;

/// Dormand-Prince 5(4): fifth-order solution, fourth-order embedded error estimate.
#[derive(Debug, Clone, Copy, Default)]
pub struct Dopri5;

const C: [f64; 7] = [0.0, 1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0, 1.0, 1.0];
const A2: [f64; 1] = [1.0 / 5.0];
const A3: [f64; 2] = [3.0 / 40.0, 9.0 / 40.0];
const A4: [f64; 3] = [44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0];
const A5: [f64; 4] = [
    19372.0 / 6561.0,
    -25360.0 / 2187.0,
    64448.0 / 6561.0,
    -212.0 / 729.0,
];
const A6: [f64; 5] = [
    9017.0 / 3168.0,
    -355.0 / 33.0,
    46732.0 / 5247.0,
    49.0 / 176.0,
    -5103.0 / 18656.0,
];
/// Fifth-order weights (also the seventh stage's row).
const B: [f64; 6] = [
    35.0 / 384.0,
    0.0,
    500.0 / 1113.0,
    125.0 / 192.0,
    -2187.0 / 6784.0,
    11.0 / 84.0,
];
/// B minus the fourth-order weights: the error estimate's weights (seven stages).
const E: [f64; 7] = [
    71.0 / 57600.0,
    0.0,
    -71.0 / 16695.0,
    71.0 / 1920.0,
    -17253.0 / 339200.0,
    22.0 / 525.0,
    -1.0 / 40.0,
];
/// Dense-output weights of Hairer's DOPRI5.
const D: [f64; 7] = [
    -12715105075.0 / 11282082432.0,
    0.0,
    87487479700.0 / 32700410799.0,
    -10690763975.0 / 1880347072.0,
    701980252875.0 / 199316789632.0,
    -1453857185.0 / 822651844.0,
    69997945.0 / 29380423.0,
];

impl Solver for Dopri5 {
    fn order(&self) -> usize {
        5
    }

    fn embedded(&self) -> bool {
        true
    }

    fn step(
        &self,
        rhs: &mut Rhs,
        t: &[f64],
        x: &Tensor,
        h: &[f64],
        f0: Option<Tensor>,
    ) -> Result<Step> {
        let k1 = first_stage(rhs, t, x, f0)?;
        let k2 = rhs.eval(&shift(t, h, C[1]), &combine(x, h, &[(A2[0], &k1)])?)?;
        let k3 = rhs.eval(
            &shift(t, h, C[2]),
            &combine(x, h, &[(A3[0], &k1), (A3[1], &k2)])?,
        )?;
        let k4 = rhs.eval(
            &shift(t, h, C[3]),
            &combine(x, h, &[(A4[0], &k1), (A4[1], &k2), (A4[2], &k3)])?,
        )?;
        let k5 = rhs.eval(
            &shift(t, h, C[4]),
            &combine(
                x,
                h,
                &[(A5[0], &k1), (A5[1], &k2), (A5[2], &k3), (A5[3], &k4)],
            )?,
        )?;
        let k6 = rhs.eval(
            &shift(t, h, C[5]),
            &combine(
                x,
                h,
                &[
                    (A6[0], &k1),
                    (A6[1], &k2),
                    (A6[2], &k3),
                    (A6[3], &k4),
                    (A6[4], &k5),
                ],
            )?,
        )?;
        let x1 = combine(
            x,
            h,
            &[
                (B[0], &k1),
                (B[2], &k3),
                (B[3], &k4),
                (B[4], &k5),
                (B[5], &k6),
            ],
        )?;
        let k7 = rhs.eval(&shift(t, h, C[6]), &x1)?;
        let ks = [&k1, &k2, &k3, &k4, &k5, &k6, &k7];
        let zero = x.zeros_like()?;
        let weighted = |w: &[f64; 7]| -> Result<Tensor> {
            let terms: Vec<(f64, &Tensor)> = w.iter().copied().zip(ks.iter().copied()).collect();
            combine(&zero, h, &terms)
        };
        let error = weighted(&E)?;
        // Dense output: r1 = x0, r2 = x1 - x0, r3 = h k1 - r2, r4 = r2 - h k7 - r3, r5 = h sum d_i k_i.
        let r2 = (&x1 - x)?;
        let hk1 = combine(&zero, h, &[(1.0, &k1)])?;
        let hk7 = combine(&zero, h, &[(1.0, &k7)])?;
        let r3 = (hk1 - &r2)?;
        let r4 = ((&r2 - hk7)? - &r3)?;
        let r5 = weighted(&D)?;
        Ok(Step {
            dense: Some(Dense::Quartic([x.clone(), r2, r3, r4, r5])),
            x: x1,
            error: Some(error),
            f_last: Some(k7),
        })
    }
}
