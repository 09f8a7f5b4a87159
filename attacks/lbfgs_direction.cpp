// The L-BFGS direction H g of many instances, one instance's history read from memory once.
//
// Same mathematics as _SlotState.update_and_multiply (the compact representation, Nocedal and
// Wright eq. 7.24), but instance by instance: the products of the history with s, y and g, the
// Gram-block update, the two triangular solves and the combination of the history rows all happen
// while that instance's history (2.5 MB for the DLG setup) is still in the CPU's cache. The batched
// torch version reads every instance's history from memory twice (two bmm calls over the whole
// batch, 160 MB each at 64 instances), and that traffic was a third of an engine tick.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

namespace {

// Dot products of a stored pair's two rows (its s and its y) with the new s, y and g (with g alone
// when ``all`` is false), reading s, y and g once for both rows. Partial sums over kBlock lanes: one
// accumulator per product would make each FMA wait for the previous one.
constexpr int64_t kBlock = 16;

template <typename T, bool all>
inline void dots(const T* r0, const T* r1, const T* s, const T* y, const T* g, int64_t D, T& a0, T& b0, T& c0,
                 T& a1, T& b1, T& c1) {
  T pa0[kBlock] = {}, pb0[kBlock] = {}, pc0[kBlock] = {}, pa1[kBlock] = {}, pb1[kBlock] = {}, pc1[kBlock] = {};
  int64_t d = 0;
  for (; d + kBlock <= D; d += kBlock) {
#pragma omp simd
    for (int64_t l = 0; l < kBlock; ++l) {
      const T u = r0[d + l], v = r1[d + l], gv = g[d + l];
      if (all) {
        const T sv = s[d + l], yv = y[d + l];
        pa0[l] += u * sv;
        pb0[l] += u * yv;
        pa1[l] += v * sv;
        pb1[l] += v * yv;
      }
      pc0[l] += u * gv;
      pc1[l] += v * gv;
    }
  }
  for (; d < D; ++d) {
    if (all) {
      pa0[0] += r0[d] * s[d];
      pb0[0] += r0[d] * y[d];
      pa1[0] += r1[d] * s[d];
      pb1[0] += r1[d] * y[d];
    }
    pc0[0] += r0[d] * g[d];
    pc1[0] += r1[d] * g[d];
  }
  for (int64_t l = 0; l < kBlock; ++l) {
    a0 += pa0[l];
    b0 += pb0[l];
    c0 += pc0[l];
    a1 += pa1[l];
    b1 += pb1[l];
    c1 += pc1[l];
  }
}

template <typename T>
void one_instance(const T* hist, T* sy, T* yy, int64_t m, int64_t D, int64_t head, int64_t n_stored, int64_t n, bool accept,
                  int64_t pos, const T* s, const T* y, const T* g, T gamma, T* out) {
  // products of every stored row with the new s and y (only needed for an accepted pair) and g; rows
  // not yet filled are zero (a fresh state is zeroed), so their products are zero without a read
  std::vector<T> ps(2 * m, T(0)), py(2 * m, T(0)), pg(2 * m, T(0));
  if (accept || n > 0) {
    for (int64_t i = 0; i < n_stored; ++i) {
      const int64_t p = (head + i) % m;
      if (accept) {
        dots<T, true>(hist + p * D, hist + (m + p) * D, s, y, g, D, ps[p], py[p], pg[p], ps[m + p], py[m + p],
                      pg[m + p]);
      } else {
        dots<T, false>(hist + p * D, hist + (m + p) * D, s, y, g, D, ps[p], py[p], pg[p], ps[m + p], py[m + p],
                       pg[m + p]);
      }
    }
  }
  if (accept) {  // the new pair's row and column of the Gram blocks, by storage position
    for (int64_t j = 0; j < m; ++j) {
      sy[j * m + pos] = py[j];      // s_j . y_new
      sy[pos * m + j] = ps[m + j];  // s_new . y_j
      yy[j * m + pos] = py[m + j];
      yy[pos * m + j] = py[m + j];
    }
  }
  for (int64_t d = 0; d < D; ++d) out[d] = gamma * g[d];
  if (n == 0) return;
  // chronological order of the ring buffer
  std::vector<int64_t> o(n);
  for (int64_t i = 0; i < n; ++i) o[i] = (head + i) % m;
  auto R = [&](int64_t i, int64_t j) { return sy[o[i] * m + o[j]]; };  // s_i . y_j, i <= j used
  // u = R^-1 S^T g (back substitution)
  std::vector<T> u(n), w(n), top(n);
  for (int64_t i = n - 1; i >= 0; --i) {
    T acc = pg[o[i]];
    for (int64_t j = i + 1; j < n; ++j) acc -= R(i, j) * u[j];
    u[i] = acc / R(i, i);
  }
  // w = D u + gamma Y^T Y u - gamma Y^T g
  for (int64_t i = 0; i < n; ++i) {
    T acc = 0;
    for (int64_t j = 0; j < n; ++j) acc += yy[o[i] * m + o[j]] * u[j];
    w[i] = R(i, i) * u[i] + gamma * acc - gamma * pg[m + o[i]];
  }
  // top = R^-T w (forward substitution)
  for (int64_t i = 0; i < n; ++i) {
    T acc = w[i];
    for (int64_t j = 0; j < i; ++j) acc -= R(j, i) * top[j];
    top[i] = acc / R(i, i);
  }
  // out = gamma g + S top - gamma Y u, the rows read again while still cached
  for (int64_t i = 0; i < n; ++i) {
    const T *srow = hist + o[i] * D, *yrow = hist + (m + o[i]) * D;
    const T cs = top[i], cy = -gamma * u[i];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] += cs * srow[d] + cy * yrow[d];
  }
}

}  // namespace

// hist (k, 2m, D), sy and yy (k, m, m) updated in place for accepted slots; head, n_hist, pos (k,)
// int64; accept, use (k,) bool; s, y, g (k, D); gamma (k,). Returns H g (k, D); a slot outside
// ``use`` gets gamma * g.
torch::Tensor lbfgs_direction(torch::Tensor hist, torch::Tensor sy, torch::Tensor yy, torch::Tensor head,
                              torch::Tensor n_hist, torch::Tensor accept, torch::Tensor pos, torch::Tensor use,
                              torch::Tensor s, torch::Tensor y, torch::Tensor g, torch::Tensor gamma) {
  TORCH_CHECK(hist.is_contiguous() && sy.is_contiguous() && yy.is_contiguous(), "history must be contiguous");
  TORCH_CHECK(hist.device().is_cpu(), "the native L-BFGS direction runs on the CPU");
  const int64_t k = hist.size(0), m = sy.size(1), D = hist.size(2);
  s = s.contiguous();
  y = y.contiguous();
  g = g.contiguous();
  auto out = torch::empty_like(g);
  // the per-slot bookkeeping as contiguous host tensors (a temporary's accessor would dangle)
  const auto head_c = head.contiguous(), n_c = n_hist.contiguous(), pos_c = pos.contiguous();
  const auto acc_c = accept.contiguous(), use_c = use.contiguous();
  const int64_t *head_a = head_c.data_ptr<int64_t>(), *n_a = n_c.data_ptr<int64_t>(), *pos_a = pos_c.data_ptr<int64_t>();
  const bool *acc_a = acc_c.data_ptr<bool>(), *use_a = use_c.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES(hist.scalar_type(), "lbfgs_direction", [&] {
    auto gamma_c = gamma.contiguous();
    const scalar_t* gam = gamma_c.data_ptr<scalar_t>();
    const scalar_t* H = hist.data_ptr<scalar_t>();
    scalar_t* SY = sy.data_ptr<scalar_t>();
    scalar_t* YY = yy.data_ptr<scalar_t>();
    const scalar_t *S = s.data_ptr<scalar_t>(), *Yp = y.data_ptr<scalar_t>(), *G = g.data_ptr<scalar_t>();
    scalar_t* O = out.data_ptr<scalar_t>();
    at::parallel_for(0, k, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = use_a[i] ? n_a[i] : 0;
        one_instance<scalar_t>(H + i * 2 * m * D, SY + i * m * m, YY + i * m * m, m, D, head_a[i], n_a[i], n, acc_a[i],
                               pos_a[i], S + i * D, Yp + i * D, G + i * D, gam[i], O + i * D);
      }
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("lbfgs_direction", &lbfgs_direction, "L-BFGS directions H g of a batch, one history read each");
}
