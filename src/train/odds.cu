// The odds-ratio term's derivatives per pair on the GPU, so that the loss's backward starts
// without a round trip to the host. The arithmetic is loss.rs's (`odds_term`), in double, term
// by term: stable log(1 - e^a), the logistic function by the sign of its argument.

__device__ double log1mexp(double a) {
  return a < -0.6931471805599453 ? log1p(-exp(a)) : log(-expm1(a));
}

// d/da log(1 - e^a) = -1 / expm1(-a).
__device__ double d_log1mexp(double a) { return -1.0 / expm1(-a); }

__device__ double sigmoid(double z) {
  if (z >= 0.0) return 1.0 / (1.0 + exp(-z));
  const double e = exp(z);
  return e / (1.0 + e);
}

// lp: [2 * pairs] mean answer log-probs (chosen, then rejected); d: their coefficients in the
// linearised odds term, same layout.
extern "C" __global__ void odds_coefficients(const float *lp, float *d, const size_t pairs,
                                             const double beta) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < pairs;
       i += (size_t)blockDim.x * gridDim.x) {
    const double w = lp[i], l = lp[pairs + i];
    const double z = (w - l) - (log1mexp(w) - log1mexp(l));
    const double c = -beta / (double)pairs * sigmoid(-z);
    d[i] = (float)(c * (1.0 - d_log1mexp(w)));
    d[pairs + i] = (float)(c * (-1.0 + d_log1mexp(l)));
  }
}
