"""The page's 8-bit logarithmic codes: round trip within the documented precision."""

import numpy as np

from bayesmanifold.maps.encoding import decode_head, encode_head


def test_codes_round_trip_within_the_documented_precision():
    rng = np.random.default_rng(0)
    n = 64
    a = np.tril(rng.dirichlet(np.full(n, 0.3), size=n))
    a /= a.sum(1, keepdims=True)
    f = rng.standard_normal((n, n)) * 10 ** rng.uniform(-6, 0, (n, n))
    f[np.triu_indices(n, 1)] = np.nan
    blob, fmax = encode_head(a, f)
    a2, f2 = decode_head(blob, fmax, n)
    assert fmax == np.nanmax(np.abs(f))
    big = a >= 1e-6
    assert np.max(np.abs(a2[big] / a[big] - 1)) < 0.029  # ±2.8 %
    assert (a2[a < 3e-7] == 0).all()
    assert (np.isnan(f2) == np.isnan(f)).all()
    big = np.abs(f) >= 1e-5 * fmax
    assert np.max(np.abs(f2[big] / f[big] - 1)) < 0.048  # ±4.7 %
    assert (np.sign(f2[big]) == np.sign(f[big])).all()
    assert (np.abs(f2[np.abs(f) < 1e-6 * fmax]) == 0).all()
    # the masked half is one repeated code: deflate takes it to almost nothing
    assert len(blob) < 0.75 * 2 * n * n * 4 / 3
