//! The two 8-bit float formats safetensors holds (`F8_E4M3`: OCP E4M3FN, no infinity;
//! `F8_E5M2`: IEEE-like), converted to and from `f64` as `ml_dtypes` and torch do:
//! rounding to nearest, ties to even; past the largest finite value E4M3FN gives NaN
//! and E5M2 infinity.

/// An 8-bit float format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fp8 {
    /// 4 exponent bits (bias 7), 3 mantissa bits; NaN is `S.1111.111`, no infinity.
    E4M3,
    /// 5 exponent bits (bias 15), 2 mantissa bits; infinities and NaNs as IEEE.
    E5M2,
}

impl Fp8 {
    /// Mantissa bits, exponent bias, the largest finite code, the code a positive
    /// overflow becomes, and the positive NaN code.
    fn params(self) -> (u32, i32, u8, u8, u8) {
        match self {
            Fp8::E4M3 => (3, 7, 0x7e, 0x7f, 0x7f),
            Fp8::E5M2 => (2, 15, 0x7b, 0x7c, 0x7e),
        }
    }

    /// The magnitude of the positive `code`, read as a finite number (the overflow code
    /// reads as the value one step past the largest finite one).
    fn magnitude(self, code: u8) -> f64 {
        let (mantissa_bits, bias, ..) = self.params();
        let exponent = i32::from(code >> mantissa_bits);
        let mantissa = f64::from(code & ((1 << mantissa_bits) - 1));
        let scale = f64::from(1u32 << mantissa_bits);
        if exponent == 0 {
            mantissa / scale * 2f64.powi(1 - bias)
        } else {
            (1.0 + mantissa / scale) * 2f64.powi(exponent - bias)
        }
    }

    /// The value of `byte`.
    pub(crate) fn decode(self, byte: u8) -> f64 {
        let (_, _, max, overflow, _) = self.params();
        let code = byte & 0x7f;
        let value = if code <= max {
            self.magnitude(code)
        } else if self == Fp8::E5M2 && code == overflow {
            f64::INFINITY
        } else {
            f64::NAN
        };
        if byte & 0x80 != 0 {
            -value
        } else {
            value
        }
    }

    /// The nearest `Fp8` to `x` (ties to even).
    pub(crate) fn encode(self, x: f64) -> u8 {
        let (_, _, max, overflow, nan) = self.params();
        if x.is_nan() {
            return nan;
        }
        let sign = if x.is_sign_negative() { 0x80 } else { 0 };
        let a = x.abs();
        // Codes 0..=overflow have increasing magnitudes: find the two around `a`.
        let code = if a >= self.magnitude(overflow) {
            overflow
        } else {
            let (mut lo, mut hi) = (0u8, overflow);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if self.magnitude(mid) <= a {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            let (below, above) = (a - self.magnitude(lo), self.magnitude(hi) - a);
            if below < above || (below == above && lo % 2 == 0) {
                lo
            } else {
                hi
            }
        };
        debug_assert!(code <= overflow && max < overflow);
        sign | if code == overflow && self == Fp8::E4M3 { nan } else { code }
    }
}

#[cfg(test)]
mod tests {
    use super::Fp8;

    #[test]
    fn edge_values_convert_as_ml_dtypes_does() {
        // (value, E4M3FN code, E5M2 code), from ml_dtypes' float32 -> float8 casts.
        let cases: [(f64, u8, u8); 17] = [
            (448.0, 0x7e, 0x5f),
            (464.0, 0x7e, 0x5f),
            (465.0, 0x7f, 0x5f),
            (480.0, 0x7f, 0x60),
            (1e9, 0x7f, 0x7c),
            (-1e9, 0xff, 0xfc),
            (f64::INFINITY, 0x7f, 0x7c),
            (f64::NEG_INFINITY, 0xff, 0xfc),
            (57344.0, 0x7f, 0x7b),
            (61439.0, 0x7f, 0x7b),
            (61440.0, 0x7f, 0x7c),
            (2f64.powi(-9), 0x01, 0x18),
            (2f64.powi(-10), 0x00, 0x14),
            (1.5 * 2f64.powi(-10), 0x01, 0x16),
            (-0.0, 0x80, 0x80),
            (2f64.powi(-17), 0x00, 0x00),
            (1.5 * 2f64.powi(-16), 0x00, 0x02),
        ];
        for (value, e4m3, e5m2) in cases {
            assert_eq!(Fp8::E4M3.encode(value), e4m3, "E4M3 {value}");
            assert_eq!(Fp8::E5M2.encode(value), e5m2, "E5M2 {value}");
        }
        assert_eq!(Fp8::E4M3.encode(f64::NAN), 0x7f);
        assert_eq!(Fp8::E5M2.encode(f64::NAN), 0x7e);
    }

    #[test]
    fn every_code_decodes_and_encodes_back() {
        for format in [Fp8::E4M3, Fp8::E5M2] {
            for byte in 0..=255u8 {
                let value = format.decode(byte);
                if value.is_nan() {
                    assert!(format.decode(format.encode(value)).is_nan());
                } else {
                    assert_eq!(format.encode(value), byte, "{format:?} {byte:#x} = {value}");
                }
            }
        }
        assert_eq!(Fp8::E4M3.decode(0x7e), 448.0);
        assert_eq!(Fp8::E5M2.decode(0x7b), 57344.0);
        assert_eq!(Fp8::E5M2.decode(0xfc), f64::NEG_INFINITY);
    }
}
