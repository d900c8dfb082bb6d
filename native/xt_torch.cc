// LibTorch (ATen) kernels for the TF.js `torch` backend.
//
// Tensors live in a registry of ATen tensors addressed by small integer ids; JS holds only the ids.
// Every op takes ids and returns the id of a new registry entry; the shape and dtype of that result
// are written into a shared Int32Array (`meta`: [dtype, rank, dims...]) so that JS needs no extra
// call to learn them. dtype codes: 0 float32, 1 int32, 2 bool.
#include <napi.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/version.h>

#include <dlfcn.h>

#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <pthread.h>
#include <signal.h>
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#include <c10/core/CPUAllocator.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <thread>
#include <cmath>
#include <list>
#include <mutex>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <unordered_map>
#include <vector>

#if __has_include(<ATen/ops/scaled_dot_product_attention.h>)
#define XT_HAS_SDPA 1
#endif
// fused attention (flash / memory-efficient kernels on CUDA) with an explicit scale: LibTorch 2.1+
#if defined(XT_HAS_SDPA) && (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1))
#define XT_SDPA 1
#include <torch/csrc/autograd/autograd.h>
#endif

namespace {

std::vector<at::Tensor> g_tensors;
// a float32 copy of a bfloat16 tensor under the same id, made on its first read by an op that takes
// float32 (get) and dropped when that op returns (g_wideMade: the ids that have one)
std::vector<at::Tensor> g_wide;
std::vector<int32_t> g_wideMade;
std::vector<int32_t> g_free;
int64_t g_live = 0;
int32_t* g_meta = nullptr;
Napi::Reference<Napi::Int32Array> g_metaRef;
at::Device g_device(at::kCPU);
// Mixed precision (setPrecision), as torch.autocast with dtype bfloat16 does it: while on, matrix
// products and attention read bfloat16 copies of their float32 operands (the products accumulate in
// float32) and keep their results in bfloat16, which TF.js sees as float32. The ops that keep a
// bfloat16 input in bfloat16 are the shape ops and a few cheap elementwise ones between products
// (getLow); every other op reads a float32 copy (get), so normalisation, softmax, reductions, the
// loss, the parameters and the optimizer state stay float32.
bool g_bf16 = false;

inline bool lowp(const at::Tensor& t) {
  return g_bf16 && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16);
}
inline at::Tensor toBf16(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t.to(at::kBFloat16) : t; }
// t's bfloat16 values as float32 (what a bfloat16 product reads of it, in float32 kernels' terms)
inline at::Tensor bf16Values(const at::Tensor& t) { return t.to(at::kBFloat16).to(at::kFloat); }

// Copies of the weights that decoding multiplies by, token after token, in the form its products
// read (a bfloat16 copy; float32 panels, see packPanels): converting a weight costs more than a
// product of a few rows with it. A copy is keyed by its source's storage and view, and dropped when
// the source's storage dies or is updated in place (AdamW).
enum class CopyKind { Bf16, Panels, JointPanels, Bf16Panels };
struct WeightCopy {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  CopyKind kind;
  int64_t offset;
  std::vector<int64_t> sizes, strides;
  at::Tensor copy;
  // whether it was made from w's view of its storage (the storage itself is compared apart)
  bool viewOf(const at::Tensor& w) const {
    return offset == w.storage_offset() && w.sizes().equals(sizes) && w.strides().equals(strides);
  }
};
std::unordered_map<const void*, std::vector<WeightCopy>> g_weightCopies;
size_t g_weightCopyCount = 0;

// w's copy of this kind, made by make() when there is none (and not kept past 4096 copies)
template <class Make>
at::Tensor cachedCopy(const at::Tensor& w, CopyKind kind, Make make) {
  if (!w.has_storage() || !w.storage().data()) return make();
  const void* key = w.storage().data();
  auto& list = g_weightCopies[key];
  const c10::StorageImpl* impl = w.storage().unsafeGetStorageImpl();
  for (auto it = list.begin(); it != list.end();) {
    if (it->storage.lock().get() != impl) {  // died, or another storage at the same address
      it = list.erase(it);
      g_weightCopyCount--;
      continue;
    }
    if (it->kind == kind && it->viewOf(w)) return it->copy;
    ++it;
  }
  // dead sources' copies go every 256 new copies (and whenever there are many)
  static size_t inserts = 0;
  if (++inserts % 256 == 0 || g_weightCopyCount >= 4096) {
    for (auto e = g_weightCopies.begin(); e != g_weightCopies.end();) {
      auto& l = e->second;
      size_t before = l.size();
      l.erase(std::remove_if(l.begin(), l.end(), [](const WeightCopy& c) { return c.storage.expired(); }), l.end());
      g_weightCopyCount -= before - l.size();
      e = l.empty() && e->first != key ? g_weightCopies.erase(e) : std::next(e);
    }
    if (g_weightCopyCount >= 4096) return make();
  }
  at::Tensor copy = make();
  g_weightCopies[key].push_back(
      {w.storage().getWeakStorageImpl(), kind, w.storage_offset(), w.sizes().vec(), w.strides().vec(), copy});
  g_weightCopyCount++;
  return copy;
}

// One copy made from several weights together (the panels of q's, k's and v's weights side by side):
// kept under each source, and valid while every source still holds it (an in-place update of any
// of them drops its entry, so the copy is made again).
template <class Make>
at::Tensor cachedJointCopy(const std::vector<at::Tensor>& ws, Make make) {
  auto entryOf = [](const at::Tensor& w, const at::Tensor* copy) -> WeightCopy* {
    auto it = g_weightCopies.find(w.storage().data());
    if (it == g_weightCopies.end()) return nullptr;
    const c10::StorageImpl* impl = w.storage().unsafeGetStorageImpl();
    for (auto& c : it->second)
      if (c.kind == CopyKind::JointPanels && c.viewOf(w) && c.storage.lock().get() == impl &&
          (!copy || c.copy.unsafeGetTensorImpl() == copy->unsafeGetTensorImpl()))
        return &c;
    return nullptr;
  };
  for (const auto& w : ws)
    if (!w.has_storage() || !w.storage().data()) return make();
  if (WeightCopy* first = entryOf(ws[0], nullptr)) {
    at::Tensor copy = first->copy;
    bool all = true;
    for (size_t i = 1; i < ws.size() && all; i++) all = entryOf(ws[i], &copy) != nullptr;
    if (all) return copy;
  }
  if (g_weightCopyCount + ws.size() > 4096) return make();
  at::Tensor copy = make();
  for (const auto& w : ws) {
    auto& list = g_weightCopies[w.storage().data()];
    // an older joint copy of this view (another weight beside it was updated) goes
    const c10::StorageImpl* impl = w.storage().unsafeGetStorageImpl();
    auto stale = [&](const WeightCopy& c) {
      return c.storage.expired() ||
             (c.kind == CopyKind::JointPanels && c.viewOf(w) && c.storage.lock().get() == impl);
    };
    size_t before = list.size();
    list.erase(std::remove_if(list.begin(), list.end(), stale), list.end());
    g_weightCopyCount -= before - list.size();
    list.push_back(
        {w.storage().getWeakStorageImpl(), CopyKind::JointPanels, w.storage_offset(), w.sizes().vec(), w.strides().vec(), copy});
    g_weightCopyCount++;
  }
  return copy;
}

at::Tensor cachedBf16(const at::Tensor& w) {
  return cachedCopy(w, CopyKind::Bf16, [&] { return toBf16(w); });
}

// an in-place update of a storage makes its copies stale
void dropWeightCopies(const at::Tensor& t) {
  if (!t.has_storage()) return;
  auto it = g_weightCopies.find(t.storage().data());
  if (it == g_weightCopies.end()) return;
  g_weightCopyCount -= it->second.size();
  g_weightCopies.erase(it);
}

at::ScalarType toScalar(int code) {
  switch (code) {
    case 0:
      return at::kFloat;
    case 1:
      return at::kInt;
    case 2:
      return at::kBool;
    default:
      throw std::runtime_error("unsupported dtype code " + std::to_string(code));
  }
}

int dtypeCode(at::ScalarType s) {
  if (s == at::kFloat || s == at::kBFloat16) return 0;  // bfloat16 is float32 to TF.js (see g_bf16)
  if (s == at::kInt) return 1;
  if (s == at::kBool) return 2;
  return -1;
}

// Brings a result to one of the three TF.js dtypes (in bf16 mode a bfloat16 result stays one).
at::Tensor normalize(const at::Tensor& t) {
  auto s = t.scalar_type();
  if (s == at::kFloat || s == at::kInt || s == at::kBool || (s == at::kBFloat16 && g_bf16)) return t;
  if (at::isFloatingType(s)) return t.to(at::kFloat);
  return t.to(at::kInt);
}

at::TensorOptions opts(at::ScalarType s) { return at::TensorOptions().dtype(s).device(g_device); }

// A CPU tensor on the device in use. To a GPU it goes through page-locked memory without waiting:
// a copy from ordinary (pageable) memory first waits for every kernel queued before it, which
// would stall the device on every small upload (a scalar, an index list). LibTorch keeps the
// page-locked block until the copy is done.
at::Tensor onDevice(const at::Tensor& cpu) {
  if (g_device.is_cpu() || !cpu.device().is_cpu()) return cpu;
  return cpu.pin_memory().to(g_device, cpu.scalar_type(), /*non_blocking=*/true, /*copy=*/false);
}

// On a GPU, gather indices are checked on the device and the result of the check is read with
// the next read of any result (reading it at once would wait for the device on every gather);
// out-of-range indices are clamped meanwhile, so that no kernel reads outside its input.
at::Tensor g_indexFault;
int64_t g_indexFaultSize = 0;

void raiseIndexFault() {
  if (!g_indexFault.defined()) return;
  bool fault = g_indexFault.item<bool>();
  g_indexFault = at::Tensor();
  if (fault)
    throw std::runtime_error("GatherV2: an index value is not in [0, " + std::to_string(g_indexFaultSize - 1) +
                             "] (found on the GPU after the op; the results computed since are not valid)");
}

struct AppendBuffer;
AppendBuffer* trackedBuffer(const at::Tensor& t);

int32_t store(at::Tensor t) {
  t = normalize(t);
  // a small view of a large storage (slice, split, unstack) would keep all of it alive; not a
  // window of a key/value append buffer (a decoding cache past maxSeqLen, whose buffer is the
  // cache's own memory): copied, its next position could not be written in place
  if (t.defined() && t.has_storage()) {
    size_t used = static_cast<size_t>(t.numel()) * t.element_size();
    size_t held = t.storage().nbytes();
    if (held > (1u << 16) && held > 2 * used && !trackedBuffer(t)) t = t.clone(at::MemoryFormat::Contiguous);
  }
  if (g_meta) {
    g_meta[0] = dtypeCode(t.scalar_type());
    int64_t r = t.dim();
    g_meta[1] = static_cast<int32_t>(r);
    for (int64_t i = 0; i < r && i < 30; i++) g_meta[2 + i] = static_cast<int32_t>(t.size(i));
  }
  int32_t id;
  if (!g_free.empty()) {
    id = g_free.back();
    g_free.pop_back();
    g_tensors[id] = std::move(t);
    g_wide[id] = at::Tensor();
  } else {
    id = static_cast<int32_t>(g_tensors.size());
    g_tensors.push_back(std::move(t));
    g_wide.emplace_back();
  }
  g_live++;
  return id;
}

// The tensor under an id as it is stored (float32, int32, bool, or in bf16 mode bfloat16).
const at::Tensor& storedId(int32_t id) {
  if (id < 0 || id >= static_cast<int32_t>(g_tensors.size()) || !g_tensors[id].defined())
    throw std::runtime_error("invalid tensor id " + std::to_string(id));
  return g_tensors[id];
}

// The tensor under an id as TF.js types it: a bfloat16 one as its float32 copy (made on the op's
// first read of it, see WideCopiesOfOp).
const at::Tensor& getId(int32_t id) {
  const at::Tensor& t = storedId(id);
  if (t.scalar_type() != at::kBFloat16) return t;
  at::Tensor& wide = g_wide[id];
  if (!wide.defined()) {
    wide = t.to(at::kFloat);
    g_wideMade.push_back(id);
  }
  return wide;
}

// Drops, when an op returns, the float32 copies it made (each op makes its own, as autocast casts per
// op: kept, a copy would double a tensor's memory for as long as it lives).
struct WideCopiesOfOp {
  ~WideCopiesOfOp() {
    for (int32_t id : g_wideMade)
      if (id < static_cast<int32_t>(g_wide.size())) g_wide[id] = at::Tensor();
    g_wideMade.clear();
  }
};

const at::Tensor& get(const Napi::Value& v) { return getId(v.As<Napi::Number>().Int32Value()); }

// For the ops that keep bfloat16 in bf16 mode: the tensor as stored; outside it, as get.
const at::Tensor& getLow(const Napi::Value& v) {
  int32_t id = v.As<Napi::Number>().Int32Value();
  return g_bf16 ? storedId(id) : getId(id);
}

std::vector<int64_t> ints(const Napi::Value& v) {
  std::vector<int64_t> out;
  if (v.IsTypedArray()) {
    auto a = v.As<Napi::Int32Array>();
    out.assign(a.Data(), a.Data() + a.ElementLength());
    return out;
  }
  auto a = v.As<Napi::Array>();
  uint32_t n = a.Length();
  out.resize(n);
  for (uint32_t i = 0; i < n; i++) out[i] = static_cast<int64_t>(a.Get(i).As<Napi::Number>().DoubleValue());
  return out;
}

// The tensor under an id for an op that writes it in place: one stored in bfloat16 is stored in
// float32 from now on (TF.js sees float32 either way; a copy for the op alone would take the write).
const at::Tensor& widenedId(int32_t id) {
  const at::Tensor& t = storedId(id);
  if (t.scalar_type() == at::kBFloat16) {
    g_tensors[id] = t.to(at::kFloat);
    g_wide[id] = at::Tensor();
  }
  return g_tensors[id];
}

// The tensors under a list of ids (an Int32Array or an array), as get reads them, or with `low`
// as getLow does.
std::vector<at::Tensor> tensorList(const Napi::Value& v, bool low = false) {
  auto one = [low](int32_t id) -> const at::Tensor& { return low && g_bf16 ? storedId(id) : getId(id); };
  std::vector<at::Tensor> out;
  if (v.IsTypedArray()) {
    auto ids = v.As<Napi::Int32Array>();
    out.reserve(ids.ElementLength());
    for (size_t i = 0; i < ids.ElementLength(); i++) out.push_back(one(ids[i]));
    return out;
  }
  auto a = v.As<Napi::Array>();
  uint32_t n = a.Length();
  out.reserve(n);
  for (uint32_t i = 0; i < n; i++) out.push_back(one(a.Get(i).As<Napi::Number>().Int32Value()));
  return out;
}

inline int num(const Napi::CallbackInfo& info, size_t i) { return info[i].As<Napi::Number>().Int32Value(); }
inline double dbl(const Napi::CallbackInfo& info, size_t i) { return info[i].As<Napi::Number>().DoubleValue(); }
inline bool flag(const Napi::CallbackInfo& info, size_t i) { return info[i].ToBoolean().Value(); }

Napi::Value idv(const Napi::CallbackInfo& info, at::Tensor t) {
  return Napi::Number::New(info.Env(), store(std::move(t)));
}

Napi::Value idList(const Napi::CallbackInfo& info, const std::vector<at::Tensor>& ts) {
  auto arr = Napi::Array::New(info.Env(), ts.size());
  for (size_t i = 0; i < ts.size(); i++) arr.Set(static_cast<uint32_t>(i), Napi::Number::New(info.Env(), store(ts[i])));
  return arr;
}

#define XT_FN(name) \
  Napi::Value name##_impl(const Napi::CallbackInfo& info); \
  Napi::Value name(const Napi::CallbackInfo& info) { \
    try { \
      c10::InferenceMode noAutograd; \
      WideCopiesOfOp wideCopies; \
      return name##_impl(info); \
    } catch (const c10::Error& e) { \
      throw Napi::Error::New(info.Env(), e.what_without_backtrace()); \
    } catch (const Napi::Error&) { \
      throw; \
    } catch (const std::exception& e) { \
      throw Napi::Error::New(info.Env(), e.what()); \
    } \
  } \
  Napi::Value name##_impl(const Napi::CallbackInfo& info)

// ---------------------------------------------------------------------------------------------
// registry, data in and out

// ---------------------------------------------------------------------------------------------
// Decoding steps run many ops on a few rows each. ATen splits some of them over its OpenMP threads
// however small (LayerNorm splits by rows), and waking the other threads costs far more than such
// an op (about 100 us each where a core is busy with something else). While small-op mode is on
// (setSmallOps), ATen sees one thread; the products below still use every thread for weights
// large enough to pay for them. OpenMP's own functions, where this LibTorch has OpenMP (weak: a
// build without it leaves them null and the mode changes nothing).
extern "C" void omp_set_num_threads(int) __attribute__((weak));
bool g_smallOps = false;
int g_threads = 1;  // the thread count set at init (at::get_num_threads outside small-op mode)

// Gives ATen `n` threads for the calls in its scope (small-op mode: back to one after them).
struct OmpThreads {
  bool active;
  // whether a scope that wants them gets the threads (small-op mode, with OpenMP and threads to give)
  static bool raises(bool want) { return want && g_smallOps && omp_set_num_threads && g_threads > 1; }
  explicit OmpThreads(bool want) : active(raises(want)) {
    if (active) omp_set_num_threads(g_threads);
  }
  ~OmpThreads() {
    if (active) omp_set_num_threads(1);
  }
};

// ---------------------------------------------------------------------------------------------
// Work shared with helper threads. A decoding step is a chain of ops of tens of microseconds each;
// OpenMP's threads cost about as much to wake on a busy core, and a thread that a busier process
// preempts holds every other one at its barrier. So the products of a batched step share their
// work another way: the calling thread and the helpers take the pieces of one op (chunks) from a
// counter, a helper writing its chunk to the op's own scratch buffer, and the caller never waits
// for a helper longer than one of its own chunks takes: a chunk a helper has not finished by then
// is taken back and computed again by the caller (the helper's result is dropped). The helpers run
// at the lowest priority (SCHED_IDLE): they take only time no other thread of the machine wants,
// so a core busy with the service's other processes gives them none and costs the step nothing. A
// job keeps its inputs alive (tensors held by it) until the last helper has let go of it.
// XT_HELPER_THREADS=n sets their number (default: the CPUs less one, at most 3; 0 turns them off).
// Their thread name is xt-helper.
struct SharedJob {
  std::vector<at::Tensor> keep;  // what the chunks read, alive while a helper may read it
  int64_t chunks = 0;
  // computes chunk c into the buffer at base (the result's own memory, or the scratch buffer: the
  // same layout)
  std::function<void(int64_t c, float* base)> run;
  // copies chunk c's part of the scratch buffer into the result
  std::function<void(int64_t c, const float* from)> collect;
  std::unique_ptr<float[]> scratch;
  std::atomic<int64_t> next{0};
  // per chunk: 0 taken (by whoever), 1 finished by a helper, 2 taken back by the caller
  std::unique_ptr<std::atomic<int>[]> state;
};

class HelperPool {
 public:
  explicit HelperPool(int n) {
    for (int i = 0; i < n; i++) {
      std::thread t([this] { loop(); });
#if defined(__linux__)
      // named before the constructor returns, so that top -H and /proc/<pid>/task/*/comm tell the
      // helpers from Node's own threads
      pthread_setname_np(t.native_handle(), "xt-helper");
#endif
      threads_.push_back(t.native_handle());
      t.detach();
    }
  }
  int count() const { return static_cast<int>(threads_.size()); }

  // Runs every chunk of `job`: the caller computes the chunks it takes into the result, and collects
  // those the helpers finished from the scratch buffer; returns when all are in the result.
  void share(const std::shared_ptr<SharedJob>& job) {
    const int64_t n = job->chunks;
    job->state.reset(new std::atomic<int>[n]);
    for (int64_t c = 0; c < n; c++) job->state[c].store(0, std::memory_order_relaxed);
    const bool helpersOnly = helpersOnly_.load(std::memory_order_relaxed);
    post(job);
    std::vector<char> mine(n, 0);
    int64_t own = 0;
    auto t0 = std::chrono::steady_clock::now();
    if (!helpersOnly)
      for (int64_t c; (c = job->next.fetch_add(1, std::memory_order_relaxed)) < n;) {
        job->run(c, nullptr);
        mine[c] = 1;
        own++;
      }
    const auto perChunk = own ? (std::chrono::steady_clock::now() - t0) / own : std::chrono::microseconds(2);
    int64_t collected = 0, takenBack = 0;
    for (int64_t c = 0; c < n; c++) {
      if (mine[c]) continue;
      // a helper has it: wait up to one chunk's time for it, then take it back
      const auto until = std::chrono::steady_clock::now() + perChunk;
      int s;
      while ((s = job->state[c].load(std::memory_order_acquire)) == 0 &&
             (helpersOnly || std::chrono::steady_clock::now() < until)) {
        if (helpersOnly) std::this_thread::yield();  // the helper may need this CPU
        else pause();
      }
      int expected = 0;
      if (s == 1 || !job->state[c].compare_exchange_strong(expected, 2, std::memory_order_acq_rel)) {
        job->collect(c, job->scratch.get());
        collected++;
      } else {
        job->run(c, nullptr);
        takenBack++;
      }
    }
    withdraw(job);
    jobs_.fetch_add(1, std::memory_order_relaxed);
    chunks_.fetch_add(n, std::memory_order_relaxed);
    helperChunks_.fetch_add(collected, std::memory_order_relaxed);
    takenBack_.fetch_add(takenBack, std::memory_order_relaxed);
  }

  // Test support: while on, the caller takes no chunk and waits for the helpers to compute them
  // all (the helpers then run at normal priority); returns the previous setting.
  bool setHelpersOnly(bool on) {
    bool prev = helpersOnly_.exchange(on);
#if defined(__linux__)
    sched_param none{};
    for (auto t : threads_) pthread_setschedparam(t, on ? SCHED_OTHER : SCHED_IDLE, &none);
#endif
    return prev;
  }

  struct Stats {
    int64_t jobs, chunks, helperChunks, takenBack;
  };
  Stats stats() const {
    return {jobs_.load(), chunks_.load(), helperChunks_.load(), takenBack_.load()};
  }

 private:
  static void pause() {
#if defined(__x86_64__)
    _mm_pause();
#endif
  }

  void post(const std::shared_ptr<SharedJob>& job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      current_ = job;
    }
    epoch_.fetch_add(1, std::memory_order_release);
    if (sleeping_.load(std::memory_order_acquire) > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      wake_.notify_all();
    }
  }

  void withdraw(const std::shared_ptr<SharedJob>& job) {
    std::lock_guard<std::mutex> lock(mu_);
    if (current_ == job) current_.reset();
  }

  void loop() {
#if defined(__linux__)
    sched_param none{};
    if (!helpersOnly_.load()) pthread_setschedparam(pthread_self(), SCHED_IDLE, &none);
#endif
    // what the chunks run stays on this thread (ATen's ops among them split nothing over OpenMP)
    if (omp_set_num_threads) omp_set_num_threads(1);
    uint64_t seen = 0;
    for (;;) {
      // spin a while for the next job (a step's ops come tens of microseconds apart), then sleep
      const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(2);
      while (epoch_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < until) pause();
      if (epoch_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lock(mu_);
        sleeping_.fetch_add(1, std::memory_order_acq_rel);
        wake_.wait(lock, [&] { return epoch_.load(std::memory_order_acquire) != seen; });
        sleeping_.fetch_sub(1, std::memory_order_acq_rel);
      }
      seen = epoch_.load(std::memory_order_acquire);
      std::shared_ptr<SharedJob> job;
      {
        std::lock_guard<std::mutex> lock(mu_);
        job = current_;
      }
      if (!job) continue;
      for (int64_t c; (c = job->next.fetch_add(1, std::memory_order_relaxed)) < job->chunks;) {
        job->run(c, job->scratch.get());
        int expected = 0;
        job->state[c].compare_exchange_strong(expected, 1, std::memory_order_acq_rel);
      }
    }
  }

  std::vector<pthread_t> threads_;
  std::mutex mu_;
  std::condition_variable wake_;
  std::shared_ptr<SharedJob> current_;
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> sleeping_{0};
  std::atomic<bool> helpersOnly_{false};
  std::atomic<int64_t> jobs_{0}, chunks_{0}, helperChunks_{0}, takenBack_{0};
};

// the helpers, started on first use; null where there are none (one CPU, or XT_HELPER_THREADS=0)
HelperPool* helpers() {
  static HelperPool* pool = []() -> HelperPool* {
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int n = static_cast<int>(std::clamp<long>(cpus - 1, 0, 3));
    if (const char* env = std::getenv("XT_HELPER_THREADS")) {
      char* end = nullptr;
      long v = std::strtol(env, &end, 10);
      if (!*env || *end || v < 0 || v > 64)
        throw std::runtime_error(std::string("XT_HELPER_THREADS: expected an integer from 0 to 64, got \"") + env +
                                 "\"");
      n = static_cast<int>(v);
    }
    return n > 0 ? new HelperPool(n) : nullptr;  // never destroyed: its threads live as long as the process
  }();
  return pool;
}

// ---------------------------------------------------------------------------------------------
// float32 matrix products. LibTorch hands CPU products to whatever BLAS it was built with; Debian's
// build uses the generic reference BLAS (about 6 GFLOP/s on one core). The oneDNN library that the
// same LibTorch links (libdnnl) exports a JIT-compiled sgemm that runs an order of magnitude faster,
// so CPU float32 products go there when the process has it (XT_GEMM=aten keeps ATen's matmul).

using SgemmFn = int (*)(char, char, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t,
                        float, float*, int64_t);
SgemmFn g_sgemm = nullptr;
// products of a few rows on the in-place kernels below (XT_SMALL_GEMV=0 turns them off)
bool g_smallGemv = true;
// most rows a product sends to those kernels (setSmallGemvRows): kSmallRows, or more while batched
// decoding wants every row's numbers to be those of the row alone
int64_t g_smallRowsLimit = 4;

std::string initGemm(const std::string& mode) {
  g_sgemm = nullptr;
  const char* small = std::getenv("XT_SMALL_GEMV");
  g_smallGemv = !(small && std::string(small) == "0");
  if (mode == "aten") return "aten";
  void* lib = dlopen("libdnnl.so.2", RTLD_LAZY | RTLD_NOLOAD);
  if (!lib && mode == "dnnl") lib = dlopen("libdnnl.so.2", RTLD_LAZY);
  if (lib) g_sgemm = reinterpret_cast<SgemmFn>(dlsym(lib, "dnnl_sgemm"));
  if (!g_sgemm && mode == "dnnl") throw std::runtime_error("XT_GEMM=dnnl but libdnnl.so.2 (dnnl_sgemm) is not available");
  return g_sgemm ? "dnnl" : "aten";
}

// How sgemm reads a matrix (the last two dims of t): row-major with a leading dimension, or
// transposed (column-major). Neither when the strides are not of that form.
struct MatLayout {
  char trans;
  int64_t ld;
};

bool matLayout(const at::Tensor& t, MatLayout& out) {
  int64_t r = t.size(-2), c = t.size(-1), sr = t.stride(-2), sc = t.stride(-1);
  if ((sc == 1 || c == 1) && sr >= std::max<int64_t>(c, 1)) {
    out = {'N', std::max<int64_t>(sr, 1)};
    return true;
  }
  if ((sr == 1 || r == 1) && sc >= std::max<int64_t>(r, 1)) {
    out = {'T', std::max<int64_t>(sc, 1)};
    return true;
  }
  return false;
}

// Products with a handful of rows (decoding: one token's activations times a weight) are bound by
// reading the weight, which sgemm packs into a buffer first; these read it once, in place, with
// AVX2 FMA where the CPU has it. y[r, j] = sum_i a[r, i] * w(i, j), a row-major with lda.
//   gemvT: w(i, j) = w[j * ldw + i] (the weight of a linear layer, [n, k]): a dot product per output
//   gemvN: w(i, j) = w[i * ldw + j] (row-major [k, n]): rows of w scaled and summed
constexpr int64_t kSmallRows = 4;

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// R rows times C columns of gemvT: y[r][j0 + c] = sum_i x[r][i] * w[(j0 + c) * ldw + i]. Every
// output is computed the same way whatever R and C: eight lanes of fused products over the multiples
// of 8, hsum256, then the remaining products one by one; so a row's numbers do not depend on the
// rows computed beside it. Blocks of several rows share the weight loads.
template <int R, int C>
__attribute__((target("avx2,fma"))) inline void gemvTBlock(int64_t k, const float* const* x, const float* w,
                                                           int64_t ldw, int64_t j0, float* const* y,
                                                           const float* prefetch = nullptr) {
  __m256 acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; r++)
#pragma GCC unroll 8
    for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    __m256 xv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) xv[r] = _mm256_loadu_ps(x[r] + i);
    // the weights of the next block of columns, a cache line per column every other step
    if (prefetch && (i & 15) == 0) {
#pragma GCC unroll 8
      for (int c = 0; c < C; c++) _mm_prefetch(reinterpret_cast<const char*>(prefetch + c * ldw + i), _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int c = 0; c < C; c++) {
      __m256 wv = _mm256_loadu_ps(w + (j0 + c) * ldw + i);
#pragma GCC unroll 8
      for (int r = 0; r < R; r++) acc[r][c] = _mm256_fmadd_ps(wv, xv[r], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; r++)
#pragma GCC unroll 8
    for (int c = 0; c < C; c++) {
      float t = hsum256(acc[r][c]);
      const float* wr = w + (j0 + c) * ldw;
      for (int64_t ii = i; ii < k; ii++) t = std::fma(x[r][ii], wr[ii], t);
      y[r][j0 + c] = t;
    }
}

// output columns [j0, j1) of gemvT: one row in blocks of 8 columns; several by blocks of 4 columns,
// each block for every row (3 at a time) while its weights are in the first-level cache, so the
// weight is read from memory once for all the rows
__attribute__((target("avx2,fma"))) void gemvTCols(int64_t m, int64_t j0, int64_t j1, int64_t k, const float* a,
                                                    int64_t lda, const float* w, int64_t ldw, float* y, int64_t ldy) {
  if (m == 1) {
    const float* xs[1] = {a};
    float* ys[1] = {y};
    int64_t j = j0;
    for (; j + 8 <= j1; j += 8) gemvTBlock<1, 8>(k, xs, w, ldw, j, ys, j + 16 <= j1 ? w + (j + 8) * ldw : nullptr);
    for (; j < j1; j++) gemvTBlock<1, 1>(k, xs, w, ldw, j, ys);
    return;
  }
  // the first rows of a block fetch the next block's weights ahead
  auto columns = [&](auto block, int64_t j, const float* next) {
    for (int64_t r = 0; r < m; r += 3) {
      int64_t r1 = std::min(r + 1, m - 1), r2 = std::min(r + 2, m - 1);
      const float* xs[3] = {a + r * lda, a + r1 * lda, a + r2 * lda};
      float* ys[3] = {y + r * ldy, y + r1 * ldy, y + r2 * ldy};
      block(m - r, xs, ys, j, r == 0 ? next : nullptr);
    }
  };
  int64_t j = j0;
  for (; j + 4 <= j1; j += 4)
    columns(
        [&](int64_t rows, const float* const* xs, float* const* ys, int64_t jb, const float* pf) {
          if (rows >= 3) gemvTBlock<3, 4>(k, xs, w, ldw, jb, ys, pf);
          else if (rows == 2) gemvTBlock<2, 4>(k, xs, w, ldw, jb, ys, pf);
          else gemvTBlock<1, 4>(k, xs, w, ldw, jb, ys, pf);
        },
        j, j + 8 <= j1 ? w + (j + 4) * ldw : nullptr);
  for (; j < j1; j++)
    columns(
        [&](int64_t rows, const float* const* xs, float* const* ys, int64_t jb, const float*) {
          if (rows >= 3) gemvTBlock<3, 1>(k, xs, w, ldw, jb, ys);
          else if (rows == 2) gemvTBlock<2, 1>(k, xs, w, ldw, jb, ys);
          else gemvTBlock<1, 1>(k, xs, w, ldw, jb, ys);
        },
        j, nullptr);
}

// output columns [j0, j1) of gemvN, in blocks of 64 (eight independent chains of fused products,
// one pass over w) and 32; every output a chain over i in order, whatever its block
__attribute__((target("avx2,fma"))) void gemvNCols(int64_t m, int64_t j0, int64_t j1, int64_t k, const float* a,
                                                    int64_t lda, const float* w, int64_t ldw, float* y, int64_t ldy) {
  for (int64_t r = 0; r < m; r++) {
    const float* x = a + r * lda;
    for (int64_t jb = j0; jb < j1;) {
      float* yr = y + r * ldy + jb;
      if (j1 - jb >= 64) {
        __m256 c[8];
        for (int q = 0; q < 8; q++) c[q] = _mm256_setzero_ps();
        for (int64_t i = 0; i < k; i++) {
          __m256 xv = _mm256_broadcast_ss(x + i);
          const float* wr = w + i * ldw + jb;
#pragma GCC unroll 8
          for (int q = 0; q < 8; q++) c[q] = _mm256_fmadd_ps(_mm256_loadu_ps(wr + 8 * q), xv, c[q]);
        }
        for (int q = 0; q < 8; q++) _mm256_storeu_ps(yr + 8 * q, c[q]);
        jb += 64;
        continue;
      }
      int64_t nj = std::min<int64_t>(32, j1 - jb);
      if (nj == 32) {
        __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
        for (int64_t i = 0; i < k; i++) {
          __m256 xv = _mm256_broadcast_ss(x + i);
          const float* wr = w + i * ldw + jb;
          c0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr), xv, c0);
          c1 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + 8), xv, c1);
          c2 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + 16), xv, c2);
          c3 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + 24), xv, c3);
        }
        _mm256_storeu_ps(yr, c0);
        _mm256_storeu_ps(yr + 8, c1);
        _mm256_storeu_ps(yr + 16, c2);
        _mm256_storeu_ps(yr + 24, c3);
      } else {
        float t[32] = {0};
        for (int64_t i = 0; i < k; i++)
          for (int64_t q = 0; q < nj; q++) t[q] += x[i] * w[i * ldw + jb + q];
        for (int64_t q = 0; q < nj; q++) yr[q] = t[q];
      }
      jb += nj;
    }
  }
}

void gemvT(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* w, int64_t ldw, float* y,
           int64_t ldy) {
  // threads only pay for themselves on large weights: at least 1M weights per thread
  int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / (8 * std::max<int64_t>(k, 1)));
  OmpThreads threads((n + 7) / 8 > grain);
  at::parallel_for(0, (n + 7) / 8, grain, [&](int64_t b0, int64_t b1) {
    gemvTCols(m, b0 * 8, std::min(n, b1 * 8), k, a, lda, w, ldw, y, ldy);
  });
}

void gemvN(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* w, int64_t ldw, float* y,
           int64_t ldy) {
  int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / (32 * std::max<int64_t>(k, 1)));
  OmpThreads threads((n + 31) / 32 > grain);
  at::parallel_for(0, (n + 31) / 32, grain, [&](int64_t b0, int64_t b1) {
    gemvNCols(m, b0 * 32, std::min(n, b1 * 32), k, a, lda, w, ldw, y, ldy);
  });
}

// Products with a few rows by a weight packed in panels (packPanels): panel p holds the weight's
// columns [16p, 16p + 16) as k rows of 16 contiguous floats, the last panel zero-padded. Each output
// y[r, j] is a sum over i in chunks of kPanelChunk: within a chunk a chain of fused multiply-adds
// from zero in the order of i, the chunks' sums then added in order. So an output's arithmetic
// depends on its row of a and column of the weight alone, whatever the rows, columns and vector
// width computed beside it (a batched decoding step gives each row its numbers alone), and the
// block of rows needs no horizontal sums: a block of R rows by P panels keeps R * P * 16
// accumulators in registers and reads each panel once for all its rows.
constexpr int64_t kPanel = 16;
constexpr int64_t kPanelChunk = 64;
// how many panel rows (cache lines) ahead the panel kernels fetch: further for blocks of three rows
// or more, whose weights come from memory at every decoding step of a batch (measured on Zen 5: a
// step of 8 rows about 10% faster at 48 than at 16; one row is no faster past 16)
constexpr int64_t kPanelAhead = 16;
constexpr int64_t kPanelAheadRows = 48;

// the chunk's sums, acc (16 lanes as `lanes` floats), into y: stored on the first chunk, added after;
// cols <= 16 of them exist
__attribute__((target("avx512f"))) inline void panelStore512(float* y, __m512 acc, int64_t cols, bool first) {
  __mmask16 mask = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
  __m512 v = first ? acc : _mm512_add_ps(_mm512_maskz_loadu_ps(mask, y), acc);
  _mm512_mask_storeu_ps(y, mask, v);
}

template <int R, int P>
__attribute__((target("avx512f"))) void panelBlock512(int64_t k, const float* const* x, const float* panels,
                                                      int64_t pstride, float* const* y, int64_t cols) {
  constexpr int64_t ahead = R >= 3 ? kPanelAheadRows : kPanelAhead;
  for (int64_t c0 = 0; c0 < k; c0 += kPanelChunk) {
    const int64_t c1 = std::min(k, c0 + kPanelChunk);
    __m512 acc[R][P];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
      for (int p = 0; p < P; p++) acc[r][p] = _mm512_setzero_ps();
    for (int64_t i = c0; i < c1; i++) {
      __m512 w[P];
      // a panel row is one cache line: fetch each panel's line `ahead` rows on (past a panel's end,
      // that is the next panel's start, which the next block reads)
#pragma GCC unroll 8
      for (int p = 0; p < P; p++)
        _mm_prefetch(reinterpret_cast<const char*>(panels + p * pstride + (i + ahead) * kPanel), _MM_HINT_T0);
#pragma GCC unroll 8
      for (int p = 0; p < P; p++) w[p] = _mm512_loadu_ps(panels + p * pstride + i * kPanel);
#pragma GCC unroll 8
      for (int r = 0; r < R; r++) {
        __m512 xb = _mm512_set1_ps(x[r][i]);
#pragma GCC unroll 8
        for (int p = 0; p < P; p++) acc[r][p] = _mm512_fmadd_ps(xb, w[p], acc[r][p]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
      for (int p = 0; p < P; p++)
        if (cols > p * kPanel) panelStore512(y[r] + p * kPanel, acc[r][p], cols - p * kPanel, c0 == 0);
  }
}

// the same on 256-bit vectors (two per panel): the same fused operations lane for lane, so the
// same numbers
__attribute__((target("avx2,fma"))) inline void panelStore256(float* y, __m256 acc, int64_t cols, bool first) {
  if (cols >= 8) {
    _mm256_storeu_ps(y, first ? acc : _mm256_add_ps(_mm256_loadu_ps(y), acc));
    return;
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, acc);
  for (int64_t c = 0; c < cols; c++) y[c] = first ? t[c] : y[c] + t[c];
}

template <int R, int P>
__attribute__((target("avx2,fma"))) void panelBlock256(int64_t k, const float* const* x, const float* panels,
                                                       int64_t pstride, float* const* y, int64_t cols) {
  for (int64_t c0 = 0; c0 < k; c0 += kPanelChunk) {
    const int64_t c1 = std::min(k, c0 + kPanelChunk);
    __m256 acc[R][2 * P];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
      for (int q = 0; q < 2 * P; q++) acc[r][q] = _mm256_setzero_ps();
    for (int64_t i = c0; i < c1; i++) {
      __m256 w[2 * P];
#pragma GCC unroll 8
      for (int p = 0; p < P; p++)
        _mm_prefetch(reinterpret_cast<const char*>(panels + p * pstride + (i + kPanelAhead) * kPanel), _MM_HINT_T0);
#pragma GCC unroll 8
      for (int q = 0; q < 2 * P; q++) w[q] = _mm256_loadu_ps(panels + (q / 2) * pstride + i * kPanel + (q % 2) * 8);
#pragma GCC unroll 8
      for (int r = 0; r < R; r++) {
        __m256 xb = _mm256_broadcast_ss(x[r] + i);
#pragma GCC unroll 8
        for (int q = 0; q < 2 * P; q++) acc[r][q] = _mm256_fmadd_ps(xb, w[q], acc[r][q]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
      for (int q = 0; q < 2 * P; q++)
        if (cols > q * 8) panelStore256(y[r] + q * 8, acc[r][q], cols - q * 8, c0 == 0);
  }
}

bool g_avx512 = __builtin_cpu_supports("avx512f") && !std::getenv("XT_NO_AVX512");

// rows [r0, r0 + R) times panels [p0, p1), P panels at a time
template <int R, int P>
void panelRows(int64_t r0, int64_t p0, int64_t p1, int64_t n, int64_t k, const float* a, int64_t lda,
               const float* panels, float* y, int64_t ldy) {
  const float* xs[R];
  float* ys[R];
  for (int r = 0; r < R; r++) xs[r] = a + (r0 + r) * lda;
  const int64_t pstride = k * kPanel;
  auto block = [&](auto one, int64_t p) {
    for (int r = 0; r < R; r++) ys[r] = y + (r0 + r) * ldy + p * kPanel;
    constexpr int Q = decltype(one)::value;
    if (g_avx512) panelBlock512<R, Q>(k, xs, panels + p * pstride, pstride, ys, n - p * kPanel);
    else panelBlock256<R, Q>(k, xs, panels + p * pstride, pstride, ys, n - p * kPanel);
  };
  int64_t p = p0;
  for (; p + P <= p1; p += P) block(std::integral_constant<int, P>(), p);
  for (; p < p1; p++) block(std::integral_constant<int, 1>(), p);
}

// y[r, j] for panels [p0, p1): groups of 8 panels (their weights stay in the second-level cache),
// each for every block of rows
void panelCols(int64_t m, int64_t p0, int64_t p1, int64_t n, int64_t k, const float* a, int64_t lda,
               const float* panels, float* y, int64_t ldy) {
  for (int64_t g0 = p0; g0 < p1; g0 += 8) {
    const int64_t g1 = std::min(p1, g0 + 8);
    int64_t r = 0;
    if (g_avx512) {
      for (; r + 8 <= m; r += 8) panelRows<8, 2>(r, g0, g1, n, k, a, lda, panels, y, ldy);
      // the rows left, in one more pass over the group's panels
      switch (m - r) {
        case 7: panelRows<7, 2>(r, g0, g1, n, k, a, lda, panels, y, ldy); break;
        case 6: panelRows<6, 4>(r, g0, g1, n, k, a, lda, panels, y, ldy); break;
        case 5: panelRows<5, 4>(r, g0, g1, n, k, a, lda, panels, y, ldy); break;
        case 4: panelRows<4, 4>(r, g0, g1, n, k, a, lda, panels, y, ldy); break;
        case 3: panelRows<3, 4>(r, g0, g1, n, k, a, lda, panels, y, ldy); break;
        case 2: panelRows<2, 8>(r, g0, g1, n, k, a, lda, panels, y, ldy); break;
        case 1: panelRows<1, 8>(r, g0, g1, n, k, a, lda, panels, y, ldy); break;
        default: break;
      }
    } else {
      for (; r + 6 <= m; r += 6) panelRows<6, 1>(r, g0, g1, n, k, a, lda, panels, y, ldy);
      for (; r + 2 <= m; r += 2) panelRows<2, 2>(r, g0, g1, n, k, a, lda, panels, y, ldy);
      for (; r < m; r++) panelRows<1, 3>(r, g0, g1, n, k, a, lda, panels, y, ldy);
    }
  }
}

// w(i, j) = w[j * ldw + i] (i < k, j < n: a linear layer's [n, k] weight, transposed) as panels
at::Tensor packPanels(const float* w, int64_t ldw, int64_t k, int64_t n) {
  const int64_t np = (n + kPanel - 1) / kPanel;
  auto out = at::zeros({np * k * kPanel}, at::TensorOptions().dtype(at::kFloat));
  float* d = out.data_ptr<float>();
  for (int64_t j = 0; j < n; j++) {
    const float* src = w + j * ldw;
    float* dst = d + (j / kPanel) * k * kPanel + j % kPanel;
    for (int64_t i = 0; i < k; i++) dst[i * kPanel] = src[i];
  }
  return out;
}

// panels per OpenMP thread in panelGemv: threads only pay for themselves on large weights, at least
// 1M weights per thread
int64_t panelGrain(int64_t k) { return std::max<int64_t>(1, (int64_t(1) << 20) / (kPanel * std::max<int64_t>(k, 1))); }

// y = a w for m rows of a (row-major, lda) and the packed weight of n columns over k
void panelGemv(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* panels, float* y,
               int64_t ldy) {
  const int64_t np = (n + kPanel - 1) / kPanel;
  const int64_t grain = panelGrain(k);
  OmpThreads threads(np > grain);
  at::parallel_for(0, np, grain, [&](int64_t b0, int64_t b1) { panelCols(m, b0, b1, n, k, a, lda, panels, y, ldy); });
}

// the least work (multiply-adds) a product of two rows or more shares with the helpers (4 rows by a
// 256 x 256 weight; one row's products read their weight faster alone), and about how much each
// chunk holds: pieces of a few microseconds, against the fraction of one that taking a chunk costs
constexpr int64_t kShareMin = int64_t(1) << 18;
constexpr int64_t kShareChunk = int64_t(1) << 18;

// panelGemv with its panels split in chunks shared with the helper threads, where the product is
// large enough and panelGemv would raise no OpenMP threads for it; the same numbers (each output is
// computed alone). aKeep and panels hold a and the packed weight alive for the helpers.
void panelGemvShared(int64_t m, int64_t n, int64_t k, const at::Tensor& aKeep, const float* a, int64_t lda,
                     const at::Tensor& panels, float* y, int64_t ldy) {
  const int64_t np = (n + kPanel - 1) / kPanel;
  const float* pp = panels.data_ptr<float>();
  HelperPool* pool = helpers();
  if (!pool || OmpThreads::raises(np > panelGrain(k)) || m < 2 || m * n * k < kShareMin || np < 2)
    return panelGemv(m, n, k, a, lda, pp, y, ldy);
  const int64_t per = std::clamp<int64_t>(kShareChunk / (m * k * kPanel), 1, np / 2);
  auto job = std::make_shared<SharedJob>();
  job->keep = {aKeep, panels};
  job->chunks = (np + per - 1) / per;
  job->scratch.reset(new float[m * ldy]);
  job->run = [=](int64_t c, float* base) {
    panelCols(m, c * per, std::min(np, (c + 1) * per), n, k, a, lda, pp, base ? base : y, ldy);
  };
  job->collect = [=](int64_t c, const float* from) {
    const int64_t j0 = c * per * kPanel, j1 = std::min(n, (c + 1) * per * kPanel);
    for (int64_t r = 0; r < m; r++)
      std::memcpy(y + r * ldy + j0, from + r * ldy + j0, sizeof(float) * (j1 - j0));
  };
  pool->share(job);
}

// The softmax pieces of a decoding step's scores, eight lanes at a time: each element gets the
// operation the scalar loop gives it (a product, a quotient), and the largest of the scores is exact;
// with a NaN among them every weight is NaN either way.
__attribute__((target("avx2,fma"))) void scaleRow(float* x, int64_t n, float s) {
  const __m256 sv = _mm256_set1_ps(s);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), sv));
  for (; j < n; j++) x[j] *= s;
}

__attribute__((target("avx2,fma"))) void divideRow(float* x, int64_t n, float s) {
  const __m256 sv = _mm256_set1_ps(s);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(x + j, _mm256_div_ps(_mm256_loadu_ps(x + j), sv));
  for (; j < n; j++) x[j] /= s;
}

__attribute__((target("avx2,fma"))) float maxRow(const float* x, int64_t n) {
  float mx = x[0];
  int64_t j = 1;
  if (n >= 9) {
    __m256 m = _mm256_loadu_ps(x + 1);
    for (j = 9; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + j));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, m);
    for (float l : lanes) mx = std::max(mx, l);
  }
  for (; j < n; j++) mx = std::max(mx, x[j]);
  return mx;
}

const bool g_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");

// The weighted sum of a decoding step's attention for one query, on raw memory and 512-bit vectors,
// two heads at a time where there are two: out[j] (j < dv) = sum over i < t of w[i] v[i * vPos + j],
// each output a chain of fused products in the order of i from zero, as gemvN computes it (so the
// same numbers), for dv a multiple of 32. Head h's weights are at w + h * wHead, its values at
// v + h * vHead, its outputs at out + h * dv. A chain of t products is bound by its latency, not by
// the loads: two heads side by side keep twice as many in flight. Without AVX-512, gemvN runs.
bool fastWeighValues(int64_t dv) { return g_avx512 && dv > 0 && dv % 32 == 0; }

template <int H, int J>
__attribute__((target("avx512f"))) inline void weighBlock512(const float* w, int64_t wHead, const float* v,
                                                             int64_t vHead, int64_t vPos, int64_t t, int64_t j0,
                                                             int64_t dv, float* out) {
  __m512 acc[H][J];
#pragma GCC unroll 2
  for (int h = 0; h < H; h++)
#pragma GCC unroll 4
    for (int j = 0; j < J; j++) acc[h][j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < t; i++) {
#pragma GCC unroll 2
    for (int h = 0; h < H; h++) {
      const __m512 wi = _mm512_set1_ps(w[h * wHead + i]);
      const float* vi = v + h * vHead + i * vPos + j0;
#pragma GCC unroll 4
      for (int j = 0; j < J; j++) acc[h][j] = _mm512_fmadd_ps(wi, _mm512_loadu_ps(vi + 16 * j), acc[h][j]);
    }
  }
#pragma GCC unroll 2
  for (int h = 0; h < H; h++)
#pragma GCC unroll 4
    for (int j = 0; j < J; j++) _mm512_storeu_ps(out + h * dv + j0 + 16 * j, acc[h][j]);
}

// Blocks of 64 features (each value row read in one pass, eight chains in flight for two heads),
// then of 32.
template <int H>
__attribute__((target("avx512f"))) void weighValues512(const float* w, int64_t wHead, const float* v, int64_t vHead,
                                                       int64_t vPos, int64_t t, int64_t dv, float* out) {
  int64_t j0 = 0;
  for (; j0 + 64 <= dv; j0 += 64) weighBlock512<H, 4>(w, wHead, v, vHead, vPos, t, j0, dv, out);
  for (; j0 < dv; j0 += 32) weighBlock512<H, 2>(w, wHead, v, vHead, vPos, t, j0, dv, out);
}

void weighValues(int heads, const float* w, int64_t wHead, const float* v, int64_t vHead, int64_t vPos, int64_t t,
                 int64_t dv, float* out) {
  if (heads == 2) weighValues512<2>(w, wHead, v, vHead, vPos, t, dv, out);
  else weighValues512<1>(w, wHead, v, vHead, vPos, t, dv, out);
}

// The scores of a decoding step's query against its keys, for d a multiple of 16: out[j] = sum over
// i < d of q[i] k_j[i], key j's row at k + j * kPos. Each key's products go into sixteen lanes (lane l
// a chain of fused products over features l, l + 16, l + 32, ..., from zero, in order), and the lanes
// are summed by one fixed tree: (g0 + g1) + (g2 + g3), where g_b = (l_4b + l_4b+2) + (l_4b+1 + l_4b+3).
// Every score is computed the same way whatever its place among the keys and whatever the vector
// width (scores512: sixteen keys share the tree's shuffles; scores256: sixteen lanes as two halves of
// eight, four keys at a time), so it depends on its key and the query alone, and a machine without
// AVX-512 gets the same numbers. scores512 with tables (cos at c + j * cs, sin at s + j * ss) first
// turns each key as turnKeys512 turns it (the same products and sums, each rounded), in registers:
// the same score as turning every key and then scoring the turned keys.
bool fastScores(int64_t d) { return (g_avx512 || g_avx2) && d > 0 && d % 16 == 0; }

// lane i of the result: the tree's sum of v[i]'s sixteen lanes, for i < 16
__attribute__((target("avx512f"))) inline __m512 laneSums16(const __m512* v) {
  __m512 p[8], q[4];
  // lanes two apart within each group of four
#pragma GCC unroll 8
  for (int i = 0; i < 8; i++)
    p[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  // then those pairs: g_b of four vectors in each group b
#pragma GCC unroll 4
  for (int i = 0; i < 4; i++) {
    const __m512d a = _mm512_castps_pd(p[2 * i]), b = _mm512_castps_pd(p[2 * i + 1]);
    q[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // g0 + g1 and g2 + g3, then their sum
  const __m512 r01 = _mm512_add_ps(_mm512_shuffle_f32x4(q[0], q[1], 0x88), _mm512_shuffle_f32x4(q[0], q[1], 0xDD));
  const __m512 r23 = _mm512_add_ps(_mm512_shuffle_f32x4(q[2], q[3], 0x88), _mm512_shuffle_f32x4(q[2], q[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(r01, r23, 0x88), _mm512_shuffle_f32x4(r01, r23, 0xDD));
}

// the tree's sum of sixteen lanes in memory
inline float treeSum16(const float* l) {
  float g[4];
  for (int b = 0; b < 4; b++) g[b] = (l[4 * b] + l[4 * b + 2]) + (l[4 * b + 1] + l[4 * b + 3]);
  return (g[0] + g[1]) + (g[2] + g[3]);
}

// key j's features [f, f + 16), turned by its table rows when Turn
template <bool Turn>
__attribute__((target("avx512f"))) inline __m512 keyChunk512(const float* k, int64_t kPos, int64_t j, int64_t f,
                                                             const float* c, int64_t cs, const float* s, int64_t ss) {
  __m512 x = _mm512_loadu_ps(k + j * kPos + f);
  if (Turn) {
    constexpr int rn = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m512 xs = _mm512_permute_ps(x, 0xB1);  // features 2i and 2i + 1 exchanged
    x = _mm512_add_round_ps(_mm512_mul_round_ps(x, _mm512_loadu_ps(c + j * cs + f), rn),
                            _mm512_mul_round_ps(xs, _mm512_loadu_ps(s + j * ss + f), rn), rn);
  }
  return x;
}

template <bool Turn>
__attribute__((target("avx512f"))) void scores512(const float* q, const float* k, int64_t kPos, int64_t t,
                                                  int64_t d, const float* c, int64_t cs, const float* s, int64_t ss,
                                                  float* out) {
  for (int64_t j0 = 0; j0 < t; j0 += 16) {
    const int nb = static_cast<int>(std::min<int64_t>(16, t - j0));
    __m512 acc[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    if (nb == 16) {
      // sixteen chains side by side, fetching the keys two blocks ahead (a cache line of each per step)
      const bool fetch = j0 + 48 <= t;
      for (int64_t f = 0; f < d; f += 16) {
        const __m512 qf = _mm512_loadu_ps(q + f);
        if (fetch) {
#pragma GCC unroll 16
          for (int jj = 0; jj < 16; jj++)
            _mm_prefetch(reinterpret_cast<const char*>(k + (j0 + 32 + jj) * kPos + f), _MM_HINT_T0);
        }
#pragma GCC unroll 16
        for (int jj = 0; jj < 16; jj++)
          acc[jj] = _mm512_fmadd_ps(qf, keyChunk512<Turn>(k, kPos, j0 + jj, f, c, cs, s, ss), acc[jj]);
      }
    } else {
      for (int jj = 0; jj < nb; jj++)
        for (int64_t f = 0; f < d; f += 16)
          acc[jj] = _mm512_fmadd_ps(_mm512_loadu_ps(q + f), keyChunk512<Turn>(k, kPos, j0 + jj, f, c, cs, s, ss),
                                    acc[jj]);
    }
    _mm512_mask_storeu_ps(out + j0, static_cast<__mmask16>((1u << nb) - 1u), laneSums16(acc));
  }
}

// laneSums16's first two levels on four vectors of eight lanes: lane 4b + i of the result is g_b of
// v[i] (its group of four lanes b, of two)
__attribute__((target("avx2"))) inline __m256 groupSums8(const __m256* v) {
  const __m256 p0 = _mm256_add_ps(_mm256_unpacklo_ps(v[0], v[1]), _mm256_unpackhi_ps(v[0], v[1]));
  const __m256 p1 = _mm256_add_ps(_mm256_unpacklo_ps(v[2], v[3]), _mm256_unpackhi_ps(v[2], v[3]));
  const __m256d a = _mm256_castps_pd(p0), b = _mm256_castps_pd(p1);
  return _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
}

__attribute__((target("avx2,fma"))) void scores256(const float* q, const float* k, int64_t kPos, int64_t t,
                                                   int64_t d, float* out) {
  for (int64_t j0 = 0; j0 < t; j0 += 4) {
    const int nb = static_cast<int>(std::min<int64_t>(4, t - j0));
    // lanes 0-7 and 8-15 of four keys
    __m256 lo[4], hi[4];
    for (int i = 0; i < 4; i++) lo[i] = hi[i] = _mm256_setzero_ps();
    if (nb == 4) {
      // eight chains side by side, fetching the keys eight groups ahead (a cache line of each per step)
      const bool fetch = j0 + 36 <= t;
      for (int64_t f = 0; f < d; f += 16) {
        const __m256 qa = _mm256_loadu_ps(q + f), qb = _mm256_loadu_ps(q + f + 8);
        if (fetch) {
#pragma GCC unroll 4
          for (int jj = 0; jj < 4; jj++)
            _mm_prefetch(reinterpret_cast<const char*>(k + (j0 + 32 + jj) * kPos + f), _MM_HINT_T0);
        }
#pragma GCC unroll 4
        for (int jj = 0; jj < 4; jj++) {
          const float* kr = k + (j0 + jj) * kPos + f;
          lo[jj] = _mm256_fmadd_ps(qa, _mm256_loadu_ps(kr), lo[jj]);
          hi[jj] = _mm256_fmadd_ps(qb, _mm256_loadu_ps(kr + 8), hi[jj]);
        }
      }
    } else {
      for (int jj = 0; jj < nb; jj++) {
        const float* kr = k + (j0 + jj) * kPos;
        for (int64_t f = 0; f < d; f += 16) {
          lo[jj] = _mm256_fmadd_ps(_mm256_loadu_ps(q + f), _mm256_loadu_ps(kr + f), lo[jj]);
          hi[jj] = _mm256_fmadd_ps(_mm256_loadu_ps(q + f + 8), _mm256_loadu_ps(kr + f + 8), hi[jj]);
        }
      }
    }
    // g0, g1 of the four keys from the low halves, g2, g3 from the high ones
    const __m256 g01 = groupSums8(lo), g23 = groupSums8(hi);
    const __m128 s01 = _mm_add_ps(_mm256_castps256_ps128(g01), _mm256_extractf128_ps(g01, 1));
    const __m128 s23 = _mm_add_ps(_mm256_castps256_ps128(g23), _mm256_extractf128_ps(g23, 1));
    alignas(16) float r[4];
    _mm_store_ps(r, _mm_add_ps(s01, s23));
    for (int jj = 0; jj < nb; jj++) out[j0 + jj] = r[jj];
  }
}

// exp(x) for x <= 0 (a softmax's shifted scores): x = n ln 2 + r with |r| <= ln 2 / 2, e^r by a
// polynomial (Cephes' expf coefficients), times 2^n; 0 below kExpLow (where exp is under 1.7e-38),
// NaN for NaN. Within one unit in the last place of the scalar exp over [kExpLow, 0] (checked at
// every eighth float). The same operations on sixteen lanes and on eight, so the same numbers.
constexpr float kExpLow = -87.0f;
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

__attribute__((target("avx512f"))) inline __m512 expNonPositive512(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpLow), _CMP_NLT_UQ);  // x >= kExpLow, or NaN
  x = _mm512_max_ps(_mm512_set1_ps(kExpLow), x);  // (a NaN stays)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpP[0]);
  for (int i = 1; i < 6; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512 twoN = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  return _mm512_maskz_mov_ps(keep, _mm512_mul_ps(p, twoN));
}

__attribute__((target("avx2,fma"))) inline __m256 expNonPositive256(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(kExpLow), _CMP_NLT_UQ);
  x = _mm256_max_ps(_mm256_set1_ps(kExpLow), x);
  const __m256 n =
      _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpP[0]);
  for (int i = 1; i < 6; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256 twoN = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  return _mm256_and_ps(_mm256_mul_ps(p, twoN), keep);
}

// A softmax row in place: the largest score (exact), each weight exp(x - max) and their sum (sixteen
// partial sums in order of position, then the scores' tree), each weight divided by the sum. The
// row's numbers depend on its own scores alone, the same on sixteen lanes and on eight.
__attribute__((target("avx512f"))) void softmaxRow512(float* x, int64_t n) {
  const __m512 mv = _mm512_set1_ps(maxRow(x, n));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - j)) - 1u);
    const __m512 e = expNonPositive512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + j), mv));
    _mm512_mask_storeu_ps(x + j, m, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, sum);
  divideRow(x, n, treeSum16(lanes));
}

__attribute__((target("avx2,fma"))) void softmaxRow256(float* x, int64_t n) {
  const __m256 mv = _mm256_set1_ps(maxRow(x, n));
  __m256 sum[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t j = 0; j < n; j += 8) {
    const int64_t left = n - j;
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(left, 8))),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 e = _mm256_and_ps(expNonPositive256(_mm256_sub_ps(_mm256_maskload_ps(x + j, m), mv)),
                                   _mm256_castsi256_ps(m));
    _mm256_maskstore_ps(x + j, m, e);
    // positions j .. j + 7 are lanes 0-7 of a block of sixteen when j is a multiple of 16, else 8-15
    sum[(j >> 3) & 1] = _mm256_add_ps(sum[(j >> 3) & 1], e);
  }
  alignas(32) float lanes[16];
  _mm256_store_ps(lanes, sum[0]);
  _mm256_store_ps(lanes + 8, sum[1]);
  divideRow(x, n, treeSum16(lanes));
}

void softmaxRowFast(float* x, int64_t n) {
  if (g_avx512) softmaxRow512(x, n);
  else softmaxRow256(x, n);
}
#else
void scaleRow(float* x, int64_t n, float s) {
  for (int64_t j = 0; j < n; j++) x[j] *= s;
}
void divideRow(float* x, int64_t n, float s) {
  for (int64_t j = 0; j < n; j++) x[j] /= s;
}
float maxRow(const float* x, int64_t n) {
  float mx = x[0];
  for (int64_t j = 1; j < n; j++) mx = std::max(mx, x[j]);
  return mx;
}
const bool g_avx2 = false;
bool fastWeighValues(int64_t) { return false; }
bool fastScores(int64_t) { return false; }
void softmaxRowFast(float*, int64_t) {}
void weighValues(int, const float*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, float*) {}
void gemvT(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t) {}
void gemvN(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t) {}
at::Tensor packPanels(const float*, int64_t, int64_t, int64_t) { return at::Tensor(); }
void panelGemv(int64_t, int64_t, int64_t, const float*, int64_t, const float*, float*, int64_t) {}
void panelGemvShared(int64_t, int64_t, int64_t, const at::Tensor&, const float*, int64_t, const at::Tensor&, float*,
                     int64_t) {}
#endif

// Whether a product of m rows goes to the in-place kernels: then every row of the result is computed
// alone, in the same order whatever the number of rows (what batched decoding relies on).
// In small-op mode (decoding, a short prompt's prefill) products of up to 32 rows also go there:
// they read the weight in place, where sgemm packs it on every call (measured faster up to 64 rows
// of a 256-wide layer on a Zen 4 core).
constexpr int64_t kSmallOpsRows = 32;
// oneDNN's generated matrix kernels (the sgemm that float32 products call, and the bfloat16
// products ATen runs on the CPU) point the stack register into the heap while they run, in some
// cases: a signal handled on such a thread writes its frame over the heap (oneDNN issue 4845, fixed
// in 2026, after the oneDNN that Debian's LibTorch links). A profiler's SIGPROF, a SIGTERM or SIGINT
// sent to a worker in the middle of a product would corrupt memory. So the calling thread keeps
// asynchronous signals pending while such a kernel runs (they are handled right after it), and
// OpenMP's threads, which run parts of it, never take them (holdSignalsInOpenMpThreads).
const sigset_t& asyncSignals() {
  static const sigset_t set = [] {
    sigset_t s;
    sigfillset(&s);
    // those a fault raises on the faulting thread (blocking them would hide the fault)
    for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGABRT, SIGSYS}) sigdelset(&s, sig);
    return s;
  }();
  return set;
}

struct SignalsHeld {
  sigset_t prev;
  bool on;
  explicit SignalsHeld(bool want) : on(want) {
    if (on) pthread_sigmask(SIG_BLOCK, &asyncSignals(), &prev);
  }
  ~SignalsHeld() {
    if (on) pthread_sigmask(SIG_SETMASK, &prev, nullptr);
  }
  SignalsHeld(const SignalsHeld&) = delete;
  SignalsHeld& operator=(const SignalsHeld&) = delete;
};

// Every OpenMP thread but the caller's blocks asynchronous signals for good: a parallel region of
// one piece per thread (the threads are made by the first region, and kept).
void holdSignalsInOpenMpThreads() {
  const int n = at::get_num_threads();
  if (n <= 1) return;
  at::parallel_for(0, n, 1, [](int64_t, int64_t) {
    if (at::get_thread_num() != 0) pthread_sigmask(SIG_BLOCK, &asyncSignals(), nullptr);
  });
}

bool smallGemvFor(int64_t m) {
  return g_avx2 && g_smallGemv && m <= std::max(g_smallRowsLimit, g_smallOps ? kSmallOpsRows : int64_t(0));
}

// bf16 mode, a few rows a [..., k] times a float32 weight's transpose b [k, n] on the CPU, on the
// panel kernels: the rows' bfloat16 values times a kept panel copy of the weight's bfloat16 values
// (each product of two bfloat16 values is exact in float32), summed in float32, the result rounded
// to bfloat16, which is what a bfloat16 product computes (up to the order of the sums), without the
// per-call cost of oneDNN's bfloat16 kernels on a product of a few rows (decoding). Returns an
// undefined tensor where it does not apply.
at::Tensor lowRowsOnPanels(const at::Tensor& a0, const at::Tensor& b0) {
  if (!(g_sgemm && b0.dim() == 2 && a0.dim() >= 2 && b0.scalar_type() == at::kFloat && b0.stride(0) == 1 &&
        a0.device().is_cpu() && b0.device().is_cpu() && b0.numel() >= 4096))
    return at::Tensor();
  const int64_t k = b0.size(0), n = b0.size(1);
  if (a0.size(-1) != k || k == 0) return at::Tensor();
  const int64_t m = a0.numel() / k;
  if (m == 0 || !smallGemvFor(m) || m > kSmallRows) return at::Tensor();
  at::Tensor panels = cachedCopy(b0, CopyKind::Bf16Panels, [&] {
    at::Tensor w = bf16Values(b0.t()).contiguous();  // [n, k]
    return packPanels(w.data_ptr<float>(), k, k, n);
  });
  at::Tensor a = bf16Values(a0.reshape({m, k})).contiguous();
  at::Tensor y = at::empty({m, n}, a.options());
  panelGemvShared(m, n, k, a, a.data_ptr<float>(), k, panels, y.data_ptr<float>(), n);
  std::vector<int64_t> shape(a0.sizes().begin(), a0.sizes().end());
  shape.back() = n;
  return y.to(at::kBFloat16).view(shape);
}

// a: [..., m, k] @ b: [..., k, n] with batch dims broadcast, as at::matmul (rank >= 2 each). In bf16
// mode the result is bfloat16 with `keepLow` (an op's result, see g_bf16), else float32.
at::Tensor xtMatmul(const at::Tensor& a0, const at::Tensor& b0, bool keepLow = false) {
  if (lowp(a0) && lowp(b0)) {
    at::Tensor rows = lowRowsOnPanels(a0, b0);
    if (rows.defined()) return keepLow ? rows : rows.to(at::kFloat);
    // a weight times a few rows (decoding): its bfloat16 copy is kept
    bool weight = b0.dim() == 2 && b0.scalar_type() == at::kFloat && a0.dim() >= 2 && a0.size(-2) <= kSmallRows &&
                  b0.numel() >= 4096;
    at::Tensor a = toBf16(a0), b = weight ? cachedBf16(b0) : toBf16(b0);
    SignalsHeld held(a.device().is_cpu());
    at::Tensor y = at::matmul(a, b);
    return keepLow ? y : y.to(at::kFloat);
  }
  if (!g_sgemm || a0.scalar_type() != at::kFloat || b0.scalar_type() != at::kFloat || !a0.device().is_cpu() ||
      !b0.device().is_cpu() || a0.dim() < 2 || b0.dim() < 2)
    return at::matmul(a0, b0);
  int64_t m = a0.size(-2), k = a0.size(-1), n = b0.size(-1);
  if (b0.size(-2) != k || m == 0 || n == 0 || k == 0) return at::matmul(a0, b0);
  at::Tensor a = a0, b = b0;
  // shared right operand (a linear layer): one product over all the rows of a
  if (b.dim() == 2 && a.dim() > 2 && a.is_contiguous()) {
    std::vector<int64_t> outShape(a.sizes().begin(), a.sizes().end());
    outShape.back() = n;
    return xtMatmul(a.view({-1, k}), b).view(outShape);
  }
  // sgemm runs products of many rows 10-20% faster with a row-major right operand when it has at
  // most 768 columns (measured on a Zen 4 core): a linear layer's transposed weight is copied
  // first, which costs a few percent of the product
  if (b.dim() == 2 && b.stride(0) == 1 && b.stride(1) != 1 && m >= 128 && n <= 768) b = b.contiguous();
  MatLayout la, lb;
  if (!matLayout(a, la)) {
    a = a.contiguous();
    matLayout(a, la);
  }
  if (!matLayout(b, lb)) {
    b = b.contiguous();
    matLayout(b, lb);
  }
  // broadcast batch shape
  int64_t ba = a.dim() - 2, bb = b.dim() - 2, nb = std::max(ba, bb);
  std::vector<int64_t> batch(nb), sa(nb, 0), sb(nb, 0);
  for (int64_t d = 0; d < nb; d++) {
    int64_t da = d - (nb - ba), db = d - (nb - bb);
    int64_t xa = da >= 0 ? a.size(da) : 1, xb = db >= 0 ? b.size(db) : 1;
    if (xa != xb && xa != 1 && xb != 1) return at::matmul(a0, b0);  // ATen words the error
    batch[d] = std::max(xa, xb);
    if (da >= 0 && xa != 1) sa[d] = a.stride(da);
    if (db >= 0 && xb != 1) sb[d] = b.stride(db);
  }
  std::vector<int64_t> outShape(batch);
  outShape.push_back(m);
  outShape.push_back(n);
  at::Tensor y = at::empty(outShape, a.options());
  int64_t count = 1;
  for (auto x : batch) count *= x;
  if (count == 0) return y;
  const float* pa = a.data_ptr<float>();
  const float* pb = b.data_ptr<float>();
  float* py = y.data_ptr<float>();
  // a few rows of a row-major left operand: read the right one in place
  const bool small = smallGemvFor(m) && la.trans == 'N';
  // a weight (a linear layer's, transposed) times a few rows: its packed panels, kept
  at::Tensor panels;
  if (small && lb.trans == 'T' && count == 1 && b.dim() == 2)
    panels = cachedCopy(b, CopyKind::Panels, [&] { return packPanels(pb, lb.ld, k, n); });
  // in small-op mode, sgemm (on OpenMP threads) still gets them for products worth it (a prompt)
  OmpThreads threads(!small && count * m * n * k >= (int64_t(1) << 21));
  std::vector<int64_t> idx(nb, 0);
  SignalsHeld held(!panels.defined() && !small);  // sgemm below
  for (int64_t i = 0; i < count; i++) {
    int64_t oa = 0, ob = 0;
    for (int64_t d = 0; d < nb; d++) {
      oa += idx[d] * sa[d];
      ob += idx[d] * sb[d];
    }
    if (panels.defined()) {
      panelGemvShared(m, n, k, a, pa + oa, la.ld, panels, py + i * m * n, n);
    } else if (small) {
      if (lb.trans == 'T') gemvT(m, n, k, pa + oa, la.ld, pb + ob, lb.ld, py + i * m * n, n);
      else gemvN(m, n, k, pa + oa, la.ld, pb + ob, lb.ld, py + i * m * n, n);
    } else {
      int st = g_sgemm(la.trans, lb.trans, m, n, k, 1.0f, pa + oa, la.ld, pb + ob, lb.ld, 0.0f, py + i * m * n, n);
      if (st != 0) throw std::runtime_error("matmul: dnnl_sgemm failed with status " + std::to_string(st));
    }
    for (int64_t d = nb - 1; d >= 0; d--) {
      if (++idx[d] < batch[d]) break;
      idx[d] = 0;
    }
  }
  return y;
}

// x [..., dim] times the weights wq, wk and wv ([n_i, dim] each, as linear layers hold them): xtMatmul
// of each, in one product over their panels side by side where the panel kernels take it (each
// output is computed as in its own product: the same numbers). Returns [..., n_i] views.
std::vector<at::Tensor> projectJoint(const at::Tensor& x, const std::vector<at::Tensor>& ws) {
  const int64_t k = x.size(-1);
  const int64_t m = k ? x.numel() / k : 0;
  bool joint = g_sgemm && !g_bf16 && m > 0 && smallGemvFor(m) && x.scalar_type() == at::kFloat && x.device().is_cpu() &&
               x.is_contiguous();
  int64_t total = 0;
  for (const auto& w : ws) {
    joint = joint && w.dim() == 2 && w.size(1) == k && w.scalar_type() == at::kFloat && w.device().is_cpu() &&
            w.is_contiguous() && w.size(0) > 0;
    total += w.dim() == 2 ? w.size(0) : 0;
  }
  std::vector<at::Tensor> out;
  if (!joint) {
    for (const auto& w : ws) out.push_back(xtMatmul(x, w.transpose(0, 1)));
    return out;
  }
  at::Tensor panels = cachedJointCopy(ws, [&] {
    auto all = at::cat(ws, 0);
    return packPanels(all.data_ptr<float>(), k, k, total);
  });
  auto a = x.view({m, k});
  auto y = at::empty({m, total}, x.options());
  panelGemvShared(m, total, k, a, a.data_ptr<float>(), k, panels, y.data_ptr<float>(), total);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  int64_t at = 0;
  for (const auto& w : ws) {
    shape.back() = w.size(0);
    out.push_back(y.narrow(1, at, w.size(0)).view(shape));
    at += w.size(0);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// CPU memory for tensors. Training allocates and frees the same activation and gradient buffers
// every step, and decoding slightly larger ones every token. From glibc's heap they fragment it
// and the process keeps growing; mapped fresh from the system each time, every page faults and is
// zeroed again. So blocks of 32 KiB and more are mapped directly, in size classes, and freed ones
// are kept, up to a bound (XT_CPU_CACHE_MB, default 64; 0 keeps none), for the next request of the
// same class; the least recently freed go back to the system first. Smaller tensors come from the
// heap, aligned as LibTorch's own.

constexpr size_t kLargeBlock = 32 * 1024;
// sizes are rounded up to eight classes per power of two (at most 12.5% more), at least a page
// apart, so that the slightly different sizes of consecutive steps share blocks
size_t blockSize(size_t n) {
  size_t top = 63 - __builtin_clzll(static_cast<unsigned long long>(n));
  size_t step = std::max<size_t>(size_t(1) << (top >= 3 ? top - 3 : 0), 4096);
  return (n + step - 1) / step * step;
}
constexpr size_t kHeader = 64;  // keeps the 64-byte alignment LibTorch expects

// LibTorch 2.3 made c10::Allocator::allocate non-const and added the pure virtual copy_data
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 3)
#define XT_ALLOCATOR_V2_3 1
#define XT_ALLOCATE_CONST
#else
#define XT_ALLOCATE_CONST const
#endif

struct CachingCpuAllocator final : public c10::Allocator {
  struct Block {
    size_t size;
    void* base;
  };
  size_t limit;
  mutable std::mutex mu;
  mutable std::list<Block> lru;  // freed blocks, oldest first
  mutable std::unordered_map<size_t, std::vector<std::list<Block>::iterator>> bySize;
  mutable size_t cached = 0;

  explicit CachingCpuAllocator(size_t limitBytes) : limit(limitBytes) {}

  static void unmap(const Block& b) { munmap(b.base, b.size); }

  // takes the oldest cached block out (caller holds mu)
  void evictOldest() const {
    Block b = lru.front();
    auto& v = bySize[b.size];
    for (auto it = v.begin(); it != v.end(); ++it)
      if ((*it)->base == b.base) {
        v.erase(it);
        break;
      }
    if (v.empty()) bySize.erase(b.size);
    lru.pop_front();
    cached -= b.size;
    unmap(b);
  }

  void* take(size_t size) const {
    {
      std::lock_guard<std::mutex> lock(mu);
      auto f = bySize.find(size);
      if (f != bySize.end() && !f->second.empty()) {
        auto it = f->second.back();
        f->second.pop_back();
        if (f->second.empty()) bySize.erase(f);
        void* base = it->base;
        lru.erase(it);
        cached -= size;
        return base;
      }
    }
    void* base = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {  // give the cache back and try once more
      {
        std::lock_guard<std::mutex> lock(mu);
        while (!lru.empty()) evictOldest();
      }
      base = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (base == MAP_FAILED) throw std::bad_alloc();
    }
    return base;
  }

  void give(void* base, size_t size) const {
    std::lock_guard<std::mutex> lock(mu);
    if (size > limit / 4) {  // a block this large would crowd out everything else
      unmap({size, base});
      return;
    }
    while (cached + size > limit && !lru.empty()) evictOldest();
    lru.push_back({size, base});
    bySize[size].push_back(std::prev(lru.end()));
    cached += size;
  }

  static void release(void* data);

  // every block starts with a header holding its mapped size (0: from the heap), so that one
  // deleter frees both kinds (LibTorch's raw_deallocate needs a single one)
  c10::DataPtr allocate(size_t n) XT_ALLOCATE_CONST override {
    void* base;
    size_t size = 0;
    if (n < kLargeBlock) {
      if (posix_memalign(&base, kHeader, n + kHeader) != 0) throw std::bad_alloc();
    } else {
      size = blockSize(n + kHeader);
      base = take(size);
    }
    *static_cast<size_t*>(base) = size;
    void* data = static_cast<char*>(base) + kHeader;
    return {data, data, &CachingCpuAllocator::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &CachingCpuAllocator::release; }

#ifdef XT_ALLOCATOR_V2_3
  // both blocks are plain host memory, whichever way they were obtained
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    if (count) std::memcpy(dest, src, count);
  }
#endif

  size_t cachedBytes() const {
    std::lock_guard<std::mutex> lock(mu);
    return cached;
  }
};

CachingCpuAllocator* g_cpuAlloc = nullptr;  // never destroyed: tensors may outlive static destructors

void CachingCpuAllocator::release(void* data) {
  if (!data) return;
  void* base = static_cast<char*>(data) - kHeader;
  size_t size = *static_cast<size_t*>(base);
  if (size == 0) std::free(base);
  else g_cpuAlloc->give(base, size);
}

// The default bound on cached CPU blocks: a 32nd of the machine's memory, from 64 MiB to 1 GiB. A
// batch of decoding sequences frees and takes many blocks of growing sizes every step (each
// sequence's keys and values); a bound below that working set unmaps and maps them again, and each
// new mapping costs a page fault per page written.
size_t defaultCpuCacheMb() {
  long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  size_t total = pages > 0 && page > 0 ? static_cast<size_t>(pages) * static_cast<size_t>(page) : 0;
  return std::clamp<size_t>((total >> 20) / 32, 64, 1024);
}

void installCpuAllocator() {
  if (g_cpuAlloc) return;
  size_t mb = defaultCpuCacheMb();
  if (const char* env = std::getenv("XT_CPU_CACHE_MB")) {
    char* end = nullptr;
    long v = std::strtol(env, &end, 10);
    if (!*env || *end || v < 0)
      throw std::runtime_error(std::string("XT_CPU_CACHE_MB: expected a non-negative integer, got \"") + env + "\"");
    mb = static_cast<size_t>(v);
  }
  g_cpuAlloc = new CachingCpuAllocator(mb << 20);
  c10::SetCPUAllocator(g_cpuAlloc, 100);
}

// n: the most rows a float32 CPU product computes row by row on the in-place kernels (at least
// kSmallRows; they serve products where oneDNN's sgemm serves the others); returns the previous value.
XT_FN(SetSmallGemvRows) {
  int64_t prev = g_smallRowsLimit;
  int64_t n = num(info, 0);
  g_smallRowsLimit = std::max<int64_t>(kSmallRows, n);
  return Napi::Number::New(info.Env(), static_cast<double>(prev));
}

// on: whether ATen runs on one thread (small-op mode, for decoding steps); returns the previous mode.
XT_FN(SetSmallOps) {
  bool on = flag(info, 0);
  bool prev = g_smallOps;
  if (on != prev && omp_set_num_threads) omp_set_num_threads(on ? 1 : g_threads);
  g_smallOps = on;
  return Napi::Boolean::New(info.Env(), prev);
}

// The helper threads (see HelperPool): how many, and how the shared work went so far: jobs shared,
// their chunks, the chunks helpers computed, the chunks taken back from a late helper.
XT_FN(Helpers) {
  HelperPool* pool = helpers();
  HelperPool::Stats st = pool ? pool->stats() : HelperPool::Stats{0, 0, 0, 0};
  auto out = Napi::Object::New(info.Env());
  out.Set("threads", pool ? pool->count() : 0);
  out.Set("jobs", static_cast<double>(st.jobs));
  out.Set("chunks", static_cast<double>(st.chunks));
  out.Set("helperChunks", static_cast<double>(st.helperChunks));
  out.Set("takenBack", static_cast<double>(st.takenBack));
  return out;
}

// on: test support, the helpers compute every shared chunk (HelperPool::setHelpersOnly); returns the
// previous setting (false where there are no helpers, and nothing changes).
XT_FN(SetHelpersOnly) {
  HelperPool* pool = helpers();
  return Napi::Boolean::New(info.Env(), pool ? pool->setHelpersOnly(flag(info, 0)) : false);
}

XT_FN(CpuCache) {
  auto out = Napi::Object::New(info.Env());
  out.Set("cachedBytes", static_cast<double>(g_cpuAlloc ? g_cpuAlloc->cachedBytes() : 0));
  out.Set("limitBytes", static_cast<double>(g_cpuAlloc ? g_cpuAlloc->limit : 0));
  return out;
}

XT_FN(Init) {
  auto meta = info[0].As<Napi::Int32Array>();
  g_metaRef = Napi::Persistent(meta);
  g_meta = meta.Data();
  int threads = num(info, 1);
  std::string dev = info[2].As<Napi::String>().Utf8Value();
  if (threads > 0) at::set_num_threads(threads);
  g_threads = at::get_num_threads();
  holdSignalsInOpenMpThreads();
  // glibc's malloc keeps its own policy (a threshold for mapping blocks that rises with the large
  // blocks freed, so that a block freed and taken again stays in its heap): tensors of 32 KiB or
  // more come from the caching allocator below, and a fixed low threshold made oneDNN's sgemm map,
  // fault in and unmap its packing buffer (about 1.4 MB for a 1024 x 256 by 256 x 1024 product) on
  // every call, which more than doubled that product's time
  installCpuAllocator();
  helpers();  // started here, so that a bad XT_HELPER_THREADS fails the backend's start
  std::string gemm = initGemm(info.Length() > 3 && info[3].IsString() ? info[3].As<Napi::String>().Utf8Value() : "");
  if (dev == "auto") {
#ifdef XT_HAS_CUDA
    dev = at::hasCUDA() ? "cuda" : "cpu";
#else
    dev = "cpu";
#endif
  }
  if (dev == "cuda") {
#ifdef XT_HAS_CUDA
    if (!at::hasCUDA()) throw std::runtime_error("XT_DEVICE=cuda but LibTorch sees no CUDA device");
    g_device = at::Device(at::kCUDA, 0);
#else
    throw std::runtime_error("XT_DEVICE=cuda but this LibTorch build has no CUDA");
#endif
  } else if (dev != "cpu") {
    throw std::runtime_error("XT_DEVICE: expected cpu, cuda or auto, got " + dev);
  }
  auto out = Napi::Object::New(info.Env());
  out.Set("threads", at::get_num_threads());
  out.Set("device", g_device.is_cuda() ? "cuda" : "cpu");
  out.Set("gemm", g_device.is_cuda() ? "aten" : gemm);
#ifdef XT_HAS_CUDA
  out.Set("cuda", at::hasCUDA());
#else
  out.Set("cuda", false);
#endif
  out.Set("version", TORCH_VERSION_MAJOR * 10000 + TORCH_VERSION_MINOR * 100 + TORCH_VERSION_PATCH);
  return out;
}

XT_FN(FromData) {
  auto shape = ints(info[1]);
  auto st = toScalar(num(info, 2));
  auto ta = info[0].As<Napi::TypedArray>();
  int64_t n = 1;
  for (auto d : shape) n *= d;
  // staged in page-locked memory when it goes to a GPU (see onDevice)
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(st).pinned_memory(!g_device.is_cpu()));
  size_t esz = t.element_size();
  size_t bytes = ta.ByteLength();
  if (bytes != static_cast<size_t>(n) * esz)
    throw std::runtime_error("fromData: expected " + std::to_string(n) + " values of " + std::to_string(esz) +
                             " bytes, got " + std::to_string(bytes) + " bytes");
  if (n > 0) {
    auto* src = static_cast<uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset();
    std::memcpy(t.data_ptr(), src, bytes);
  }
  if (!g_device.is_cpu()) t = t.to(g_device, st, /*non_blocking=*/true, /*copy=*/false);
  return idv(info, t);
}

XT_FN(ToData) {
  at::Tensor t = get(info[0]);
  raiseIndexFault();
  if (!t.device().is_cpu()) t = t.to(at::kCPU);
  t = t.contiguous();
  size_t n = t.numel();
  auto env = info.Env();
  switch (t.scalar_type()) {
    case at::kFloat: {
      auto a = Napi::Float32Array::New(env, n);
      if (n) std::memcpy(a.Data(), t.data_ptr(), n * 4);
      return a;
    }
    case at::kInt: {
      auto a = Napi::Int32Array::New(env, n);
      if (n) std::memcpy(a.Data(), t.data_ptr(), n * 4);
      return a;
    }
    case at::kBool: {
      auto a = Napi::Uint8Array::New(env, n);
      if (n) std::memcpy(a.Data(), t.data_ptr(), n);
      return a;
    }
    default:
      throw std::runtime_error("toData: unsupported dtype");
  }
}

// drops the tensor under id (an id already free is ignored)
void freeId(int32_t id) {
  if (id >= 0 && id < static_cast<int32_t>(g_tensors.size()) && g_tensors[id].defined()) {
    g_tensors[id] = at::Tensor();
    g_wide[id] = at::Tensor();
    g_free.push_back(id);
    g_live--;
  }
}

XT_FN(Free) {
  freeId(num(info, 0));
  return info.Env().Undefined();
}

// Frees several ids at once (an Int32Array or an array of ids); ids already free are ignored.
XT_FN(FreeList) {
  for (int64_t id : ints(info[0])) freeId(static_cast<int32_t>(id));
  return info.Env().Undefined();
}

XT_FN(Count) { return Napi::Number::New(info.Env(), static_cast<double>(g_live)); }

// Bytes of the distinct storages behind live tensors (views share their base's storage).
XT_FN(Bytes) {
  std::vector<const void*> seen;
  double b = 0;
  for (auto& t : g_tensors) {
    if (!t.defined() || !t.has_storage()) continue;
    const void* p = t.storage().data();
    if (std::find(seen.begin(), seen.end(), p) != seen.end()) continue;
    seen.push_back(p);
    b += static_cast<double>(t.storage().nbytes());
  }
  return Napi::Number::New(info.Env(), b);
}

// Distinct storages of live tensors: [[bytes, "shape of the first tensor using it"], ...] (debugging).
XT_FN(Storages) {
  std::vector<const void*> seen;
  auto arr = Napi::Array::New(info.Env());
  uint32_t k = 0;
  for (auto& t : g_tensors) {
    if (!t.defined() || !t.has_storage()) continue;
    const void* p = t.storage().data();
    if (std::find(seen.begin(), seen.end(), p) != seen.end()) continue;
    seen.push_back(p);
    std::string shape;
    for (auto d : t.sizes()) shape += (shape.empty() ? "" : ",") + std::to_string(d);
    auto row = Napi::Array::New(info.Env(), 2);
    row.Set(0u, static_cast<double>(t.storage().nbytes()));
    row.Set(1u, shape);
    arr.Set(k++, row);
  }
  return arr;
}

// Size in bytes of the storage behind one id (test support: proves disposal frees storage).
XT_FN(StorageUseCount) {
  const at::Tensor& t = storedId(num(info, 0));
  return Napi::Number::New(info.Env(), static_cast<double>(t.storage().use_count()));
}

// ---------------------------------------------------------------------------------------------
// elementwise

at::Tensor asFloat(const at::Tensor& t) { return at::isFloatingType(t.scalar_type()) ? t : t.to(at::kFloat); }

XT_FN(Unary) {
  int op = num(info, 0);
  // negation, absolute value, square, relu, relu6, identity and GELU keep bfloat16 (as autocast runs
  // them in their input's type); the others take float32
  const bool low = op == 0 || op == 1 || op == 6 || op == 11 || op == 27 || op == 39 || op == 40;
  const at::Tensor& x = low ? getLow(info[1]) : get(info[1]);
  double a = info.Length() > 2 ? dbl(info, 2) : 0.0;
  at::Tensor y;
  switch (op) {
    case 0: y = at::neg(x); break;
    case 1: y = at::abs(x); break;
    case 2: y = at::exp(asFloat(x)); break;
    case 3: y = at::log(asFloat(x)); break;
    case 4: y = at::sqrt(asFloat(x)); break;
    case 5: y = at::rsqrt(asFloat(x)); break;
    case 6: y = at::mul(x, x); break;
    case 7: y = at::reciprocal(asFloat(x)); break;
    case 8: y = at::sign(x); break;
    case 9: y = at::tanh(asFloat(x)); break;
    case 10: y = at::sigmoid(asFloat(x)); break;
    case 11: y = at::relu(x); break;
    case 12: y = at::erf(asFloat(x)); break;
    case 13: y = x.is_floating_point() ? at::floor(x) : x; break;
    case 14: y = x.is_floating_point() ? at::ceil(x) : x; break;
    case 15: y = x.is_floating_point() ? at::round(x) : x; break;
    case 16: y = at::sin(asFloat(x)); break;
    case 17: y = at::cos(asFloat(x)); break;
    case 18: y = at::logical_not(x); break;
    case 19: y = at::log1p(asFloat(x)); break;
    case 20: y = at::expm1(asFloat(x)); break;
    case 21: y = at::isnan(x); break;
    case 22: y = at::isinf(x); break;
    case 23: y = at::isfinite(x); break;
    case 24: {  // softplus as TF.js computes it
      y = at::softplus(asFloat(x));
      break;
    }
    case 25: y = at::elu(asFloat(x)); break;
    case 26: y = at::selu(asFloat(x)); break;
    case 27: y = at::clamp(x, 0, 6); break;
    case 28: {  // Step: x > 0 ? 1 : alpha (NaN stays NaN)
      auto xf = asFloat(x);
      y = at::where(at::gt(xf, 0), at::ones({}, xf.options()), at::full({}, a, xf.options()));
      y = at::where(at::isnan(xf), xf, y).to(x.scalar_type() == at::kBool ? at::kFloat : x.scalar_type());
      break;
    }
    case 29: y = at::leaky_relu(asFloat(x), a); break;
    case 30: y = at::atan(asFloat(x)); break;
    case 31: y = at::asin(asFloat(x)); break;
    case 32: y = at::acos(asFloat(x)); break;
    case 33: y = at::sinh(asFloat(x)); break;
    case 34: y = at::cosh(asFloat(x)); break;
    case 35: y = at::tan(asFloat(x)); break;
    case 36: y = at::asinh(asFloat(x)); break;
    case 37: y = at::acosh(asFloat(x)); break;
    case 38: y = at::atanh(asFloat(x)); break;
    case 39: y = x.clone(); break;  // Identity shares nothing with its input
    case 40: {  // GELU (erf form), used by fused paths
      y = at::gelu(x.scalar_type() == at::kBFloat16 ? x : asFloat(x));
      break;
    }
    default:
      throw std::runtime_error("unary: unknown op " + std::to_string(op));
  }
  return idv(info, y);
}

XT_FN(Binary) {
  int op = num(info, 0);
  // sums, differences, products, quotients, maxima and minima take bfloat16 operands as they are
  // (two give bfloat16; with a float32 one, float32); the others take float32
  const bool low = op == 0 || op == 1 || op == 2 || op == 3 || op == 7 || op == 8;
  const at::Tensor& a = low ? getLow(info[1]) : get(info[1]);
  const at::Tensor& b = low ? getLow(info[2]) : get(info[2]);
  at::Tensor y;
  switch (op) {
    case 0: y = at::add(a, b); break;
    case 1: y = at::sub(a, b); break;
    case 2: y = at::mul(a, b); break;
    case 3: y = at::div(a, b); break;
    case 4: y = at::div(a, b, "floor").to(at::kInt); break;  // TF.js FloorDiv gives int32
    case 5: y = at::remainder(a, b); break;
    case 6: {
      if (a.is_floating_point() || b.is_floating_point()) y = at::pow(a, b);
      else y = at::pow(a.to(at::kFloat), b.to(at::kFloat)).round().to(a.scalar_type());
      break;
    }
    case 7: y = at::maximum(a, b); break;
    case 8: y = at::minimum(a, b); break;
    case 9: {
      auto d = at::sub(a, b);
      y = at::mul(d, d);
      break;
    }
    case 10: y = at::eq(a, b); break;
    case 11: y = at::ne(a, b); break;
    case 12: y = at::lt(a, b); break;
    case 13: y = at::le(a, b); break;
    case 14: y = at::gt(a, b); break;
    case 15: y = at::ge(a, b); break;
    case 16: y = at::logical_and(a, b); break;
    case 17: y = at::logical_or(a, b); break;
    case 18: y = at::atan2(asFloat(a), asFloat(b)); break;
    case 19: {  // DivNoNan
      auto q = at::div(a, b);
      y = at::where(at::eq(b, 0), at::zeros({}, q.options()), q);
      break;
    }
    case 20: {  // Prelu
      y = at::where(at::lt(a, 0), at::mul(a, b), a);
      break;
    }
    case 21: y = at::logical_xor(a, b); break;
    default:
      throw std::runtime_error("binary: unknown op " + std::to_string(op));
  }
  return idv(info, y);
}

XT_FN(Cast) {
  const at::Tensor& x = get(info[0]);
  auto st = toScalar(num(info, 1));
  if (x.scalar_type() == st) return idv(info, x);
  return idv(info, x.to(st));
}

XT_FN(Where) { return idv(info, at::where(get(info[0]), get(info[1]), get(info[2]))); }

XT_FN(Clip) {
  const at::Tensor& x = get(info[0]);
  return idv(info, at::clamp(x, dbl(info, 1), dbl(info, 2)).to(x.scalar_type()));
}

XT_FN(AddN) {
  auto ts = tensorList(info[0]);
  at::Tensor y = ts[0].clone();
  for (size_t i = 1; i < ts.size(); i++) y.add_(ts[i]);
  return idv(info, y);
}

// ---------------------------------------------------------------------------------------------
// shapes

XT_FN(Reshape) { return idv(info, getLow(info[0]).reshape(ints(info[1]))); }
XT_FN(Transpose) { return idv(info, getLow(info[0]).permute(ints(info[1]))); }
XT_FN(BroadcastTo) { return idv(info, getLow(info[0]).expand(ints(info[1]))); }
XT_FN(Contiguous) { return idv(info, getLow(info[0]).contiguous()); }

XT_FN(Concat) {
  auto ts = tensorList(info[0], /*low=*/true);
  return idv(info, at::cat(ts, num(info, 1)));
}

XT_FN(Stack) {
  auto ts = tensorList(info[0], /*low=*/true);
  return idv(info, at::stack(ts, num(info, 1)));
}

XT_FN(Unstack) { return idList(info, at::unbind(getLow(info[0]), num(info, 1))); }

XT_FN(Split) {
  auto sizes = ints(info[1]);
  return idList(info, at::split_with_sizes(getLow(info[0]), sizes, num(info, 2)));
}

XT_FN(Slice) {
  at::Tensor x = getLow(info[0]);
  auto begin = ints(info[1]);
  auto size = ints(info[2]);
  if (begin.size() != size.size() || static_cast<int64_t>(begin.size()) > x.dim())
    throw std::runtime_error("slice: begin and size must have one entry per dimension");
  for (size_t d = 0; d < begin.size(); d++) {
    int64_t s = size[d] < 0 ? x.size(d) - begin[d] : size[d];
    if (begin[d] != 0 || s != x.size(d)) x = x.slice(d, begin[d], begin[d] + s);
  }
  return idv(info, x);
}

// out[i0, i1, ...] = x[begin0 + i0 * stride0, ...] with out shape `outShape`.
XT_FN(StridedSlice) {
  at::Tensor x = getLow(info[0]);
  auto begin = ints(info[1]);
  auto strides = ints(info[2]);
  auto outShape = ints(info[3]);
  if (begin.size() != strides.size() || begin.size() != outShape.size() || static_cast<int64_t>(begin.size()) > x.dim())
    throw std::runtime_error("stridedSlice: begin, strides and shape must have one entry per dimension");
  for (size_t d = 0; d < begin.size(); d++) {
    int64_t b = begin[d], s = strides[d], n = outShape[d];
    if (n == 0) {
      x = x.slice(d, 0, 0);
    } else if (s > 0) {
      if (!(b == 0 && s == 1 && n == x.size(d))) x = x.slice(d, b, b + (n - 1) * s + 1, s);
    } else {
      auto idx = at::arange(b, b + n * s, s, at::TensorOptions().dtype(at::kLong).device(x.device()));
      x = x.index_select(d, idx);
    }
  }
  return idv(info, x);
}

XT_FN(Pad) {
  const at::Tensor& x = get(info[0]);
  auto p = ints(info[1]);  // [before0, after0, before1, after1, ...]
  std::vector<int64_t> tp;
  for (int64_t d = static_cast<int64_t>(p.size() / 2) - 1; d >= 0; d--) {
    tp.push_back(p[2 * d]);
    tp.push_back(p[2 * d + 1]);
  }
  return idv(info, at::constant_pad_nd(x, tp, dbl(info, 2)));
}

XT_FN(MirrorPad) {
  at::Tensor x = get(info[0]);
  auto p = ints(info[1]);
  bool symmetric = flag(info, 2);
  for (size_t d = 0; d < p.size() / 2; d++) {
    int64_t l = p[2 * d], r = p[2 * d + 1], n = x.size(d);
    if (l == 0 && r == 0) continue;
    std::vector<int64_t> idx;
    for (int64_t j = -l; j < n + r; j++) {
      int64_t k = j;
      if (j < 0) k = symmetric ? -j - 1 : -j;
      else if (j >= n) k = symmetric ? 2 * n - 1 - j : 2 * n - 2 - j;
      idx.push_back(k);
    }
    auto it = x.device().is_cpu() ? at::tensor(idx, at::TensorOptions().dtype(at::kLong))
                                  : onDevice(at::tensor(idx, at::TensorOptions().dtype(at::kLong)));
    x = x.index_select(d, it);
  }
  return idv(info, x);
}

XT_FN(Tile) { return idv(info, get(info[0]).repeat(ints(info[1]))); }
XT_FN(Reverse) { return idv(info, get(info[0]).flip(ints(info[1]))); }

// ---------------------------------------------------------------------------------------------
// indexing

XT_FN(Gather) {
  const at::Tensor& x = get(info[0]);
  const at::Tensor& idx = get(info[1]);
  int64_t axis = num(info, 2);
  auto flat = idx.reshape({-1}).to(at::kLong);
  if (flat.numel() > 0 && !x.device().is_cpu() && x.size(axis) > 0) {
    int64_t n = x.size(axis);
    auto bad = flat.lt(0).logical_or_(flat.ge(n)).any();
    g_indexFault = g_indexFault.defined() ? g_indexFault.logical_or(bad) : bad;
    g_indexFaultSize = n;
    flat = flat.clamp(0, n - 1);
  } else if (flat.numel() > 0) {
    auto mm = at::aminmax(flat);
    int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
    int64_t n = x.size(axis);
    if (lo < 0 || hi >= n)
      throw std::runtime_error("GatherV2: the index value " + std::to_string(lo < 0 ? lo : hi) + " is not in [0, " +
                               std::to_string(n - 1) + "]");
  }
  at::Tensor y;
  if (x.dim() > 2 && axis == x.dim() - 1 && x.numel() > 0 && x.is_contiguous())
    // the same copy; index_select along dim 1 of a 2-D view is several times faster here
    y = x.view({x.numel() / x.size(axis), x.size(axis)}).index_select(1, flat);
  else
    y = x.index_select(axis, flat);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().begin() + axis);
  for (auto s : idx.sizes()) shape.push_back(s);
  for (int64_t d = axis + 1; d < x.dim(); d++) shape.push_back(x.size(d));
  return idv(info, y.reshape(shape));
}

// Flat row index of each index tuple in `idx` ([..., k]) into the first k dims of `shape`.
at::Tensor flatIndex(const at::Tensor& idx, at::IntArrayRef shape) {
  int64_t k = idx.size(-1);
  std::vector<int64_t> strides(k);
  int64_t s = 1;
  for (int64_t d = k - 1; d >= 0; d--) {
    strides[d] = s;
    s *= shape[d];
  }
  auto st = at::tensor(strides, at::TensorOptions().dtype(at::kLong));
  if (!idx.device().is_cpu()) st = onDevice(st);
  return (idx.to(at::kLong) * st).sum(-1).reshape({-1});
}

XT_FN(GatherNd) {
  const at::Tensor& x = get(info[0]);
  const at::Tensor& idx = get(info[1]);
  int64_t k = idx.size(-1);
  if (k > x.dim())
    throw std::runtime_error("gatherND: index innermost dimension length must be <= tensor rank; saw: " +
                             std::to_string(k) + " vs. " + std::to_string(x.dim()));
  auto flat = flatIndex(idx, x.sizes());
  std::vector<int64_t> rows = {-1};
  for (int64_t d = k; d < x.dim(); d++) rows.push_back(x.size(d));
  auto y = x.reshape(rows).index_select(0, flat);
  std::vector<int64_t> shape(idx.sizes().begin(), idx.sizes().end() - 1);
  for (int64_t d = k; d < x.dim(); d++) shape.push_back(x.size(d));
  return idv(info, y.reshape(shape));
}

XT_FN(ScatterNd) {
  at::Tensor idx = get(info[0]);
  if (idx.dim() == 1) idx = idx.unsqueeze(-1);  // rank-1 indices address dim 0
  const at::Tensor& upd = get(info[1]);
  auto shape = ints(info[2]);
  int64_t k = idx.size(-1);
  auto flat = flatIndex(idx, shape);
  std::vector<int64_t> rows = {1};
  for (int64_t d = 0; d < k; d++) rows[0] *= shape[d];
  for (size_t d = k; d < shape.size(); d++) rows.push_back(shape[d]);
  auto out = at::zeros(rows, upd.options());
  std::vector<int64_t> urows = {-1};
  for (size_t d = k; d < shape.size(); d++) urows.push_back(shape[d]);
  out.index_add_(0, flat, upd.reshape(urows));
  return idv(info, out.reshape(shape));
}

XT_FN(SegmentSum) {
  const at::Tensor& x = get(info[0]);
  const at::Tensor& seg = get(info[1]);
  int64_t n = num(info, 2);
  std::vector<int64_t> shape = {n};
  for (int64_t d = seg.dim(); d < x.dim(); d++) shape.push_back(x.size(d));
  std::vector<int64_t> rows = {-1};
  for (int64_t d = seg.dim(); d < x.dim(); d++) rows.push_back(x.size(d));
  auto ids = seg.reshape({-1}).to(at::kLong);
  auto src = x.reshape(rows);
  // ids outside [0, n) are dropped, as in TF.js
  auto keep = at::logical_and(at::ge(ids, 0), at::lt(ids, n));
  if (!x.device().is_cpu() && n > 0) {
    // without reading `keep` back (a wait for the device): dropped rows add zeros to segment 0
    std::vector<int64_t> kshape = {-1};
    for (int64_t d = 1; d < src.dim(); d++) kshape.push_back(1);
    src = at::where(keep.reshape(kshape), src, at::zeros({}, src.options()));
    ids = at::where(keep, ids, at::zeros({}, ids.options()));
  } else if (!keep.all().item<bool>()) {
    auto sel = at::nonzero(keep).reshape({-1});
    ids = ids.index_select(0, sel);
    src = src.index_select(0, sel);
  }
  auto out = at::zeros(shape, x.options());
  out.index_add_(0, ids, src);
  return idv(info, out);
}

XT_FN(OneHot) {
  const at::Tensor& idx = get(info[0]);
  int64_t depth = num(info, 1);
  double on = dbl(info, 2), off = dbl(info, 3);
  auto st = toScalar(num(info, 4));
  auto r = at::arange(depth, at::TensorOptions().dtype(at::kLong).device(idx.device()));
  auto eq = at::eq(idx.to(at::kLong).unsqueeze(-1), r);
  return idv(info, at::where(eq, at::full({}, on, opts(st)), at::full({}, off, opts(st))));
}

// The order of the top-k kernels: larger first, NaN above every number (NaNs equal to each other).
template <typename T>
inline bool aboveNanFirst(T a, T b) {
  bool na = a != a, nb = b != b;
  return na ? !nb : (!nb && a > b);
}

// The k largest of each row of a CPU float32 or int32 tensor, by a partial sort of indices: the
// order of a stable descending sort (NaN first, ties by lower index), without sorting whole rows.
template <typename T>
void topkRows(const at::Tensor& x, int64_t k, at::Tensor& values, at::Tensor& indices) {
  int64_t n = x.size(-1), rows = n > 0 ? x.numel() / n : 0;
  const T* px = x.data_ptr<T>();
  T* pv = values.data_ptr<T>();
  int32_t* pi = indices.data_ptr<int32_t>();
  int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<int32_t> idx(n);
    for (int64_t r = r0; r < r1; r++) {
      const T* row = px + r * n;
      auto before = [row](int32_t a, int32_t b) {
        if (aboveNanFirst(row[a], row[b])) return true;
        return !aboveNanFirst(row[b], row[a]) && a < b;
      };
      for (int64_t j = 0; j < n; j++) idx[j] = static_cast<int32_t>(j);
      std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), before);
      for (int64_t j = 0; j < k; j++) {
        pv[r * k + j] = row[idx[j]];
        pi[r * k + j] = idx[j];
      }
    }
  });
}

// A float's place in the top-k filter's order as an unsigned key: larger values get larger keys,
// every NaN the largest, and -0 the key of 0 (the order aboveNanFirst compares by).
inline uint32_t rankKey(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t mag = u & 0x7fffffffu;
  uint32_t key = (u >> 31) ? ~u : (u | 0x80000000u);
  key = mag == 0 ? 0x80000000u : key;
  return mag > 0x7f800000u ? 0xffffffffu : key;
}

// keys[j] = rankKey(row[j]) for j < n, eight at a time where the CPU has AVX2
void rankKeys(const float* row, int64_t n, uint32_t* keys);
// dst[j] = row[j] where keys[j] > kth, else -inf (row's bits copied as they are)
void keepAbove(const float* row, const uint32_t* keys, uint32_t kth, int64_t n, float* dst);

#if defined(__x86_64__)
__attribute__((target("avx2"))) void rankKeysAvx2(const float* row, int64_t n, uint32_t* keys) {
  const __m256i low31 = _mm256_set1_epi32(0x7fffffff), top = _mm256_set1_epi32(int(0x80000000u));
  const __m256i inf = _mm256_set1_epi32(0x7f800000), zero = _mm256_setzero_si256();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j));
    __m256i mag = _mm256_and_si256(u, low31);
    // negative: every bit flipped; positive: the sign bit set
    __m256i key = _mm256_xor_si256(u, _mm256_or_si256(_mm256_srai_epi32(u, 31), top));
    key = _mm256_blendv_epi8(key, top, _mm256_cmpeq_epi32(mag, zero));
    key = _mm256_or_si256(key, _mm256_cmpgt_epi32(mag, inf));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + j), key);
  }
  for (; j < n; j++) keys[j] = rankKey(row[j]);
}

__attribute__((target("avx2"))) void keepAboveAvx2(const float* row, const uint32_t* keys, uint32_t kth, int64_t n,
                                                   float* dst) {
  // unsigned order through the signed compare, both sides with the sign bit flipped
  const __m256i flip = _mm256_set1_epi32(int(0x80000000u)), t = _mm256_set1_epi32(int(kth ^ 0x80000000u));
  const __m256 neg = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256i k = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j)), flip);
    __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(k, t));
    _mm256_storeu_ps(dst + j, _mm256_blendv_ps(neg, _mm256_loadu_ps(row + j), keep));
  }
  for (; j < n; j++) dst[j] = keys[j] > kth ? row[j] : -std::numeric_limits<float>::infinity();
}
#endif

void rankKeys(const float* row, int64_t n, uint32_t* keys) {
#if defined(__x86_64__)
  if (g_avx2) return rankKeysAvx2(row, n, keys);
#endif
  for (int64_t j = 0; j < n; j++) keys[j] = rankKey(row[j]);
}

void keepAbove(const float* row, const uint32_t* keys, uint32_t kth, int64_t n, float* dst) {
#if defined(__x86_64__)
  if (g_avx2) return keepAboveAvx2(row, keys, kth, n, dst);
#endif
  for (int64_t j = 0; j < n; j++) dst[j] = keys[j] > kth ? row[j] : -std::numeric_limits<float>::infinity();
}

// Counts of 12 bits of each key ((key >> shift) & 0xfff), in four interleaved tables summed at the
// end, so that runs of one bucket do not wait on each other's increments.
void countBuckets(const uint32_t* keys, int64_t n, int shift, std::vector<int64_t>& hist) {
  static thread_local std::vector<int64_t> part;
  part.assign(4 * 4096, 0);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4)
    for (int q = 0; q < 4; q++) part[q * 4096 + ((keys[j + q] >> shift) & 0xfff)]++;
  for (; j < n; j++) part[(keys[j] >> shift) & 0xfff]++;
  hist.assign(4096, 0);
  for (int q = 0; q < 4; q++)
    for (int i = 0; i < 4096; i++) hist[i] += part[q * 4096 + i];
}

// The k-th largest of n keys (1 <= k <= n) and how many keys are larger. Few keys: a selection
// over a copy. Many: a radix selection, the top 12 bits counted over all keys, then the next 12
// over those in the k-th key's bucket, then a selection among the few left, so a row costs two
// passes of counting rather than a selection's comparisons over the whole vocabulary.
struct KthKey {
  uint32_t key;
  int64_t above;
};
KthKey kthLargestKey(const uint32_t* keys, int64_t n, int64_t k, std::vector<uint32_t>& work) {
  auto finish = [&](int64_t m, int64_t need, int64_t above) -> KthKey {
    std::nth_element(work.begin(), work.begin() + (need - 1), work.begin() + m, std::greater<uint32_t>());
    const uint32_t kth = work[need - 1];
    // the keys before the k-th are not smaller than it, those after not larger
    for (int64_t j = 0; j < need - 1; j++) above += work[j] > kth;
    return {kth, above};
  };
  if (n <= 4096) {
    work.assign(keys, keys + n);
    return finish(n, k, 0);
  }
  static thread_local std::vector<int64_t> hist;
  countBuckets(keys, n, 20, hist);
  int64_t top = 4095, above = 0;
  while (above + hist[top] < k) above += hist[top--];
  // the keys of that bucket, counted by their next 12 bits
  work.clear();
  for (int64_t j = 0; j < n; j++)
    if ((keys[j] >> 20) == static_cast<uint32_t>(top)) work.push_back(keys[j]);
  countBuckets(work.data(), static_cast<int64_t>(work.size()), 8, hist);
  int64_t mid = 4095;
  while (above + hist[mid] < k) above += hist[mid--];
  int64_t m = 0;
  for (uint32_t key : work)
    if (((key >> 8) & 0xfff) == static_cast<uint32_t>(mid)) work[m++] = key;
  return finish(m, k - above, above);
}

// The top-k sampling filter: each row's k largest entries (chosen as TopK chooses them) kept, the
// others -inf. logits: [b, v] float32 -> [b, v].
XT_FN(TopKFilter) {
  const at::Tensor& x = get(info[0]);
  int64_t k = num(info, 1);
  if (x.dim() != 2 || k < 0 || k > x.size(1)) throw std::runtime_error("topKFilter: expected [b, v] logits and k <= v");
  const float neg = -std::numeric_limits<float>::infinity();
  if (!(x.device().is_cpu() && x.scalar_type() == at::kFloat)) {
    auto idx = std::get<1>(at::sort(x, true, -1, true)).narrow(-1, 0, k);
    return idv(info, at::full_like(x, neg).scatter_(-1, idx, x.gather(-1, idx)));
  }
  // the kept set needs no order: the k-th largest key, then every larger entry and as many entries
  // with that key as are left, lowest index first (NaN counts as the largest, -0 as 0)
  auto xc = x.contiguous();
  int64_t b = xc.size(0), v = xc.size(1);
  if (k == 0) return idv(info, at::full({b, v}, neg, xc.options()));
  auto out = at::empty({b, v}, xc.options());
  const float* px = xc.data_ptr<float>();
  float* po = out.data_ptr<float>();
  // kept between calls: a vocabulary-sized buffer from the heap would be mapped and zeroed each time
  static thread_local std::vector<uint32_t> keys, work;
  keys.resize(v);
  work.reserve(v);
  for (int64_t r = 0; r < b; r++) {
    const float* row = px + r * v;
    float* dst = po + r * v;
    rankKeys(row, v, keys.data());
    const KthKey kth = kthLargestKey(keys.data(), v, k, work);
    keepAbove(row, keys.data(), kth.key, v, dst);
    // then the entries equal to the k-th, lowest index first, as many as the k places leave
    for (int64_t j = 0, ties = k - kth.above; ties > 0; j++)
      if (keys[j] == kth.key) {
        dst[j] = row[j];
        ties--;
      }
  }
  return idv(info, out);
}

// Row indices in descending order of their keys, equal keys in index order (a stable descending
// sort of the row, NaN first): a radix sort of the flipped keys, 8 bits a pass, each pass stable.
// The four passes' counts come from one read of the keys, and a pass whose digit is the same for
// every key (the top byte of logits often is) leaves the order as it is and is skipped.
void descendingOrder(const uint32_t* keys, int64_t n, int32_t* order) {
  static thread_local std::vector<uint32_t> k0, k1;
  static thread_local std::vector<int32_t> i1;
  k0.resize(n);
  k1.resize(n);
  i1.resize(n);
  int64_t count[4][256] = {};
  for (int64_t j = 0; j < n; j++) {
    const uint32_t key = ~keys[j];
    k0[j] = key;
    order[j] = static_cast<int32_t>(j);
    count[0][key & 0xff]++;
    count[1][(key >> 8) & 0xff]++;
    count[2][(key >> 16) & 0xff]++;
    count[3][key >> 24]++;
  }
  uint32_t* ks = k0.data();
  uint32_t* kd = k1.data();
  int32_t* is = order;
  int32_t* id = i1.data();
  for (int pass = 0; pass < 4; pass++) {
    const int shift = 8 * pass;
    if (n == 0 || count[pass][(ks[0] >> shift) & 0xff] == n) continue;
    int64_t start[256];
    int64_t at = 0;
    for (int q = 0; q < 256; q++) {
      start[q] = at;
      at += count[pass][q];
    }
    for (int64_t j = 0; j < n; j++) {
      const int64_t to = start[(ks[j] >> shift) & 0xff]++;
      kd[to] = ks[j];
      id[to] = is[j];
    }
    std::swap(ks, kd);
    std::swap(is, id);
  }
  // after an odd number of passes the order is in the scratch buffer
  if (is != order) std::copy(is, is + n, order);
}

// Nucleus (top-p) filter: per row, the logits in the order of a stable descending sort, their
// softmax and its running sum (ATen's, as the composite computes them); a sorted entry stays when it
// is the first or the mass before it is not above thres; the others become -inf.
XT_FN(TopPFilter) {
  const at::Tensor& x = get(info[0]);
  const float thres = static_cast<float>(dbl(info, 1));
  if (x.dim() != 2) throw std::runtime_error("topPFilter: expected [b, v] logits");
  const int64_t b = x.size(0), v = x.size(1);
  const float neg = -std::numeric_limits<float>::infinity();
  if (v == 0) return idv(info, x.clone());
  if (!(x.device().is_cpu() && x.scalar_type() == at::kFloat)) {
    auto sorted = at::sort(x, /*stable=*/true, -1, /*descending=*/true);
    const at::Tensor &vals = std::get<0>(sorted), &idx = std::get<1>(sorted);
    // kept: the first, and those whose predecessor's running sum is not above thres
    auto over = at::cumsum(at::softmax(vals, -1), 1, vals.scalar_type()).narrow(1, 0, v - 1).gt(thres);
    auto removed = at::cat({at::zeros({b, 1}, over.options()), over}, 1);
    auto kept = at::where(removed, at::full({}, neg, vals.options()), vals);
    return idv(info, at::full_like(x, neg).scatter_(1, idx, kept));
  }
  auto xc = x.contiguous();
  const float* px = xc.data_ptr<float>();
  auto order = at::empty({b, v}, at::TensorOptions().dtype(at::kInt));
  auto sorted = at::empty({b, v}, xc.options());
  int32_t* po = order.data_ptr<int32_t>();
  float* ps = sorted.data_ptr<float>();
  static thread_local std::vector<uint32_t> keys;
  keys.resize(v);
  for (int64_t r = 0; r < b; r++) {
    const float* row = px + r * v;
    int32_t* ord = po + r * v;
    rankKeys(row, v, keys.data());
    descendingOrder(keys.data(), v, ord);
    for (int64_t j = 0; j < v; j++) ps[r * v + j] = row[ord[j]];
  }
  auto cum = at::cumsum(at::softmax(sorted, -1), 1, sorted.scalar_type()).contiguous();
  const float* pc = cum.data_ptr<float>();
  auto out = at::empty({b, v}, xc.options());
  float* pout = out.data_ptr<float>();
  for (int64_t r = 0; r < b; r++) {
    const int32_t* ord = po + r * v;
    const float* srow = ps + r * v;
    const float* crow = pc + r * v;
    float* dst = pout + r * v;
    dst[ord[0]] = srow[0];
    for (int64_t j = 1; j < v; j++) dst[ord[j]] = crow[j - 1] > thres ? neg : srow[j];
  }
  return idv(info, out);
}

XT_FN(TopK) {
  const at::Tensor& x = get(info[0]);
  int64_t k = num(info, 1);
  bool sorted = flag(info, 2);
  (void)sorted;  // always sorted; ties keep the lower index first, as in TF.js
  if (x.device().is_cpu() && x.dim() >= 1 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kInt) &&
      k >= 0 && k <= x.size(-1) && x.size(-1) < (int64_t(1) << 31)) {
    auto xc = x.contiguous();
    auto shape = xc.sizes().vec();
    shape.back() = k;
    auto values = at::empty(shape, xc.options());
    auto indices = at::empty(shape, xc.options().dtype(at::kInt));
    if (xc.scalar_type() == at::kFloat) topkRows<float>(xc, k, values, indices);
    else topkRows<int32_t>(xc, k, values, indices);
    return idList(info, {values, indices});
  }
  auto r = at::sort(x, true, -1, true);
  return idList(info, {std::get<0>(r).narrow(-1, 0, k), std::get<1>(r).narrow(-1, 0, k)});
}

XT_FN(Cumulative) {
  at::Tensor x = get(info[0]);
  int64_t axis = num(info, 1);
  bool exclusive = flag(info, 2), reverse = flag(info, 3), prod = flag(info, 4);
  if (x.scalar_type() == at::kBool) x = x.to(at::kInt);
  if (reverse) x = x.flip({axis});
  at::Tensor y = prod ? at::cumprod(x, axis, x.scalar_type()) : at::cumsum(x, axis, x.scalar_type());
  if (exclusive) {
    int64_t n = x.size(axis);
    auto first = prod ? at::ones_like(x.narrow(axis, 0, n > 0 ? 1 : 0)) : at::zeros_like(x.narrow(axis, 0, n > 0 ? 1 : 0));
    y = at::cat({first, y.narrow(axis, 0, n > 0 ? n - 1 : 0)}, axis);
  }
  if (reverse) y = y.flip({axis});
  return idv(info, y);
}

// ---------------------------------------------------------------------------------------------
// creation

XT_FN(Fill) {
  auto shape = ints(info[0]);
  return idv(info, at::full(shape, dbl(info, 1), opts(toScalar(num(info, 2)))));
}

XT_FN(FillLike) {
  const at::Tensor& x = get(info[0]);
  return idv(info, at::full(x.sizes(), dbl(info, 1), x.options()));
}

XT_FN(Multinomial) {
  const at::Tensor& logits = get(info[0]);
  int64_t n = num(info, 1);
  int64_t seed = static_cast<int64_t>(dbl(info, 2));
  bool normalized = flag(info, 3);
  auto probs = normalized ? logits : at::softmax(logits, -1);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
  auto cpuProbs = probs.to(at::kCPU).to(at::kDouble);
  auto r = at::multinomial(cpuProbs, n, true, gen);
  return idv(info, r.to(g_device));
}

// ---------------------------------------------------------------------------------------------
// reductions, matmul, softmax

XT_FN(Reduce) {
  int op = num(info, 0);
  at::Tensor x = get(info[1]);
  auto axes = ints(info[2]);
  bool keep = flag(info, 3);
  if (axes.empty()) return idv(info, x);
  if ((op == 0 || op == 4) && (x.scalar_type() == at::kBool)) x = x.to(at::kInt);
  at::Tensor y;
  switch (op) {
    case 0: y = at::sum(x, axes, keep, x.scalar_type()); break;
    case 1: y = at::mean(asFloat(x), axes, keep); break;
    case 2: y = at::amax(x, axes, keep); break;
    case 3: y = at::amin(x, axes, keep); break;
    case 4:
    case 5:
    case 6: {  // prod, all, any: one axis at a time (descending keeps indices valid)
      std::vector<int64_t> ax = axes;
      std::sort(ax.begin(), ax.end(), std::greater<int64_t>());
      y = x;
      for (auto a : ax) {
        if (op == 4) y = at::prod(y, a, keep, x.scalar_type());
        else if (op == 5) y = at::all(y, a, keep);
        else y = at::any(y, a, keep);
      }
      break;
    }
    case 7: y = at::logsumexp(asFloat(x), axes, keep); break;
    default:
      throw std::runtime_error("reduce: unknown op " + std::to_string(op));
  }
  return idv(info, y);
}

XT_FN(ArgReduce) {
  int op = num(info, 0);
  at::Tensor x = get(info[1]);
  int64_t axis = num(info, 2);
  if (x.scalar_type() == at::kBool) x = x.to(at::kInt);
  if (x.is_floating_point())  // NaNs never win, as in TF.js
    x = at::where(at::isnan(x), at::full({}, op == 0 ? -INFINITY : INFINITY, x.options()), x);
  return idv(info, op == 0 ? at::argmax(x, axis) : at::argmin(x, axis));
}

// The right operand of a matmul, laid out row-major when that pays: BLAS runs much faster with
// a row-major right operand, and copying it costs O(k n) against the product's O(m k n).
at::Tensor denseRhs(const at::Tensor& a, const at::Tensor& b) {
  if (b.dim() >= 2 && b.stride(-1) != 1 && a.size(-2) >= 8 && b.size(-1) > 1) return b.contiguous();
  return b;
}

// Row-major copies of transposed right operands for products with few rows (decoding one token
// at a time multiplies by the same weights over and over). Tensors in the registry are never
// modified in place, so a copy stays valid while its source lives; the weak pointer tells when it
// died (and guards against a new tensor reusing the same address).
struct RhsEntry {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> source;
  at::Tensor dense;
};
std::unordered_map<const c10::TensorImpl*, RhsEntry> g_rhsCache;

at::Tensor cachedDenseRhs(const at::Tensor& source, const at::Tensor& view) {
  const c10::TensorImpl* impl = source.unsafeGetTensorImpl();
  auto it = g_rhsCache.find(impl);
  if (it != g_rhsCache.end()) {
    if (it->second.source.lock().get() == impl) return it->second.dense;
    g_rhsCache.erase(it);
  }
  if (g_rhsCache.size() >= 256) {
    for (auto e = g_rhsCache.begin(); e != g_rhsCache.end();) e = e->second.source.expired() ? g_rhsCache.erase(e) : std::next(e);
  }
  at::Tensor dense = view.contiguous();
  if (g_rhsCache.size() < 1024)
    g_rhsCache.emplace(impl, RhsEntry{c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(source.getIntrusivePtr()), dense});
  return dense;
}

XT_FN(MatMul) {
  at::Tensor a = getLow(info[0]);
  const at::Tensor& b0 = getLow(info[1]);
  at::Tensor b = b0;
  if (flag(info, 2)) a = a.transpose(-2, -1);
  if (flag(info, 3)) b = b.transpose(-2, -1);
  at::Tensor y;
  if (g_sgemm || (lowp(a) && lowp(b))) {
    y = xtMatmul(a, b, /*keepLow=*/true);  // reads transposed operands in place
  } else {
    at::Tensor rhs;
    if (b.dim() == 2 && b.stride(-1) != 1 && a.size(-2) < 8 && b.numel() >= 4096)
      rhs = cachedDenseRhs(b0, b);
    else
      rhs = denseRhs(a, b);
    y = at::matmul(a, rhs);
  }
  if (info.Length() > 4 && info[4].IsNumber()) {
    int32_t bias = num(info, 4);
    if (bias >= 0) y.add_(get(info[4]));
  }
  if (info.Length() > 5) {
    int act = num(info, 5);
    double alpha = info.Length() > 6 ? dbl(info, 6) : 0.0;
    switch (act) {
      case 0: break;
      case 1: y.relu_(); break;
      case 2: y.clamp_(0, 6); break;
      case 3: y = at::elu(y); break;
      case 4: y = at::leaky_relu(y, alpha); break;
      case 5: y.sigmoid_(); break;
      default: throw std::runtime_error("fusedMatMul: unsupported activation");
    }
  }
  return idv(info, y);
}

XT_FN(Softmax) {
  const at::Tensor& x = get(info[0]);
  int64_t dim = num(info, 1);
  return idv(info, flag(info, 2) ? at::log_softmax(x, dim) : at::softmax(x, dim));
}

XT_FN(Einsum) {
  std::string eq = info[0].As<Napi::String>().Utf8Value();
  auto ts = tensorList(info[1], /*low=*/true);
  if (g_bf16 && std::all_of(ts.begin(), ts.end(), [](const at::Tensor& t) { return lowp(t); })) {
    for (auto& t : ts) t = toBf16(t);
    return idv(info, at::einsum(eq, ts));
  }
  for (auto& t : ts)
    if (t.scalar_type() == at::kBFloat16) t = t.to(at::kFloat);
  return idv(info, at::einsum(eq, ts));
}

// x: [n, h, w, c] (NHWC), f: [fh, fw, cin, cout]; pads [top, bottom, left, right].
XT_FN(Conv2D) {
  const at::Tensor& x = get(info[0]);
  const at::Tensor& f = get(info[1]);
  auto s = ints(info[2]);
  auto p = ints(info[3]);
  auto dl = ints(info[4]);
  auto xt = x.permute({0, 3, 1, 2});
  if (p[0] || p[1] || p[2] || p[3]) xt = at::constant_pad_nd(xt, {p[2], p[3], p[0], p[1]}, 0);
  auto w = f.permute({3, 2, 0, 1});
  auto y = at::conv2d(xt, w, at::Tensor(), at::IntArrayRef(s), at::IntArrayRef({0, 0}), at::IntArrayRef(dl), 1);
  return idv(info, y.permute({0, 2, 3, 1}));
}

// ---------------------------------------------------------------------------------------------
// fused attention: q [b, h, i, d], k [b, h, j, d], v [b, h, j, dv], mask bool broadcastable to
// [b, h, i, j] (true = keep), causal masks key positions j > i + (nj - ni).

at::Tensor attnScores(const at::Tensor& q, const at::Tensor& k, const at::Tensor* mask, double scale, bool causal) {
  auto s = xtMatmul(q, g_sgemm ? k.transpose(-2, -1) : denseRhs(q, k.transpose(-2, -1))).mul_(scale);
  const double neg = -std::numeric_limits<float>::max();
  if (mask) s.masked_fill_(at::logical_not(*mask), neg);
  if (causal && q.size(-2) > 1) {  // one query row (decoding) may attend every key
    int64_t ni = q.size(-2), nj = k.size(-2);
    auto cm = at::ones({ni, nj}, at::TensorOptions().dtype(at::kBool).device(q.device())).triu(nj - ni + 1);
    s.masked_fill_(cm, neg);
  }
  return s;
}

// Causal self-attention without a mask, computed by blocks of query rows: the rows [i0, i1) of a
// block see only keys [0, i1), so the scores above the diagonal blocks are never computed (about
// half the work of the full square). Same numbers as the full computation up to the order of the
// softmax sums. Used for CPU float32 q, k, v of one shape [b, h, n, d] with n >= 2 blocks.
constexpr int64_t kCausalBlock = 64;

bool causalBlocked(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* mask, bool causal) {
  return causal && !mask && g_sgemm && q.dim() == 4 && q.sizes() == k.sizes() && q.sizes() == v.sizes() &&
         q.device().is_cpu() && q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
         v.scalar_type() == at::kFloat && q.size(2) >= 2 * kCausalBlock;
}

// probabilities of query rows [i0, i1) over keys [0, i1): [b, h, i1 - i0, i1]
at::Tensor causalBlockProbs(const at::Tensor& q, const at::Tensor& k, int64_t i0, int64_t i1, double scale) {
  auto s = xtMatmul(q.narrow(2, i0, i1 - i0), k.narrow(2, 0, i1).transpose(-2, -1)).mul_(scale);
  auto diag = at::ones({i1 - i0, i1 - i0}, at::TensorOptions().dtype(at::kBool)).triu(1);
  s.narrow(3, i0, i1 - i0).masked_fill_(diag, -std::numeric_limits<float>::max());
  return at::softmax(s, -1);
}

at::Tensor causalBlockedForward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  int64_t n = q.size(2);
  auto out = at::empty(q.sizes(), q.options());
  for (int64_t i0 = 0; i0 < n; i0 += kCausalBlock) {
    int64_t i1 = std::min(n, i0 + kCausalBlock);
    auto p = causalBlockProbs(q, k, i0, i1, scale);
    out.narrow(2, i0, i1 - i0).copy_(xtMatmul(p, v.narrow(2, 0, i1)));
  }
  return out;
}

std::vector<at::Tensor> causalBlockedBackward(const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& v, double scale) {
  int64_t n = q.size(2);
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::zeros(k.sizes(), k.options());
  auto dv = at::zeros(v.sizes(), v.options());
  for (int64_t i0 = 0; i0 < n; i0 += kCausalBlock) {
    int64_t i1 = std::min(n, i0 + kCausalBlock), rows = i1 - i0;
    auto p = causalBlockProbs(q, k, i0, i1, scale);
    auto dyb = dy.narrow(2, i0, rows);
    dv.narrow(2, 0, i1).add_(xtMatmul(p.transpose(-2, -1), dyb));
    auto dp = xtMatmul(dyb, v.narrow(2, 0, i1).transpose(-2, -1));
    auto ds = p * (dp - (dp * p).sum(-1, true));
    ds.mul_(scale);
    dq.narrow(2, i0, rows).copy_(xtMatmul(ds, k.narrow(2, 0, i1)));
    dk.narrow(2, 0, i1).add_(xtMatmul(ds.transpose(-2, -1), q.narrow(2, i0, rows)));
  }
  return {dq, dk, dv};
}

// The arguments shared by the attention kernels, from position `at`: q, k, v, mask id (-1: none),
// scale, causal.
struct AttnArgs {
  const at::Tensor& q;
  const at::Tensor& k;
  const at::Tensor& v;
  const at::Tensor* mask;
  double scale;
  bool causal;
};

bool useSdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* mask, bool causal);

// In bf16 mode, bfloat16 q, k and v stay so where the fused kernel takes them; any other path reads
// float32.
AttnArgs attnArgs(const Napi::CallbackInfo& info, size_t at) {
  const at::Tensor* mask = num(info, at + 3) >= 0 ? &get(info[at + 3]) : nullptr;
  double scale = dbl(info, at + 4);
  bool causal = flag(info, at + 5);
  const at::Tensor &q = getLow(info[at]), &k = getLow(info[at + 1]), &v = getLow(info[at + 2]);
  if (useSdpa(q, k, v, mask, causal)) return {q, k, v, mask, scale, causal};
  return {get(info[at]), get(info[at + 1]), get(info[at + 2]), mask, scale, causal};
}

// Where LibTorch's fused attention (at::scaled_dot_product_attention: flash or memory-efficient
// kernels on CUDA) computes what the composite does: no mask, float q, k, v of one rank-4 batch
// shape, and causal only for square scores (the composite's causal mask of a longer key sequence
// is offset, SDPA's is not). One query row attends every key either way.
bool useSdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* mask, bool causal) {
#ifdef XT_SDPA
  // float32, or bfloat16 in bf16 mode
  auto floating = [](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat || (g_bf16 && t.scalar_type() == at::kBFloat16);
  };
  return !mask && (!causal || q.size(-2) == k.size(-2) || q.size(-2) == 1) && q.dim() == 4 && k.dim() == 4 &&
         v.dim() == 4 && floating(q) && floating(k) && floating(v) && q.size(0) == k.size(0) &&
         q.size(1) == k.size(1) && k.sizes().slice(0, 3) == v.sizes().slice(0, 3);
#else
  return false;
#endif
}

#ifdef XT_SDPA
at::Tensor sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool causal) {
  bool square = causal && q.size(-2) == k.size(-2) && q.size(-2) > 1;
  // bf16 mode: a bfloat16 result (see g_bf16)
  if (g_bf16) return at::scaled_dot_product_attention(toBf16(q), toBf16(k), toBf16(v), {}, 0.0, square, scale);
  return at::scaled_dot_product_attention(q, k, v, {}, 0.0, square, scale);
}

// The gradients of sdpa through LibTorch's autograd (the fused kernels' own backward): the forward
// is recomputed on copies that record the graph, outside the inference mode the kernels run in.
std::vector<at::Tensor> sdpaBackward(const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, double scale, bool causal) {
  c10::InferenceMode recording(false);
  auto leaf = [](const at::Tensor& t) { return (g_bf16 ? toBf16(t) : t.clone()).detach().requires_grad_(true); };
  at::Tensor ql = leaf(q), kl = leaf(k), vl = leaf(v);
  bool square = causal && q.size(-2) == k.size(-2) && q.size(-2) > 1;
  at::Tensor out = at::scaled_dot_product_attention(ql, kl, vl, {}, 0.0, square, scale);
  at::Tensor g = g_bf16 ? toBf16(dy) : dy.clone();
  auto grads = torch::autograd::grad({out}, {ql, kl, vl}, {g});
  // bfloat16 gradients stay so in bf16 mode (see g_bf16)
  std::vector<at::Tensor> res;
  for (auto& t : grads) res.push_back(g_bf16 ? t : t.to(at::kFloat));
  return res;
}
#endif

// softmax(scores) v over the whole score matrix: the composite attention's ops, in its order
at::Tensor denseAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* mask,
                          double scale, bool causal) {
  auto p = at::softmax(attnScores(q, k, mask, scale, causal), -1);
  auto out = xtMatmul(p, v);
  // query rows whose mask row has no true entry give 0
  if (mask) out.masked_fill_(at::logical_not(mask->any(-1, true)), 0);
  return out;
}

at::Tensor attentionForward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* mask,
                            double scale, bool causal) {
#ifdef XT_SDPA
  if (useSdpa(q, k, v, mask, causal)) return sdpa(q, k, v, scale, causal);
#endif
  if (causalBlocked(q, k, v, mask, causal)) return causalBlockedForward(q, k, v, scale);
  return denseAttention(q, k, v, mask, scale, causal);
}

XT_FN(Attention) {
  auto [q, k, v, mask, scale, causal] = attnArgs(info, 0);
  return idv(info, attentionForward(q, k, v, mask, scale, causal));
}

XT_FN(AttentionGrad) {
  auto [q, k, v, mask, scale, causal] = attnArgs(info, 1);
#ifdef XT_SDPA
  if (useSdpa(q, k, v, mask, causal)) return idList(info, sdpaBackward(getLow(info[0]), q, k, v, scale, causal));
#endif
  const at::Tensor& dyIn = get(info[0]);
  if (causalBlocked(q, k, v, mask, causal)) return idList(info, causalBlockedBackward(dyIn, q, k, v, scale));
  auto p = at::softmax(attnScores(q, k, mask, scale, causal), -1);
  at::Tensor dy = dyIn;
  if (mask) dy = dyIn.masked_fill(at::logical_not(mask->any(-1, true)), 0);
  auto dv = xtMatmul(p.transpose(-2, -1), dy);
  auto dp = xtMatmul(dy, g_sgemm ? v.transpose(-2, -1) : denseRhs(dy, v.transpose(-2, -1)));
  auto ds = p * (dp - (dp * p).sum(-1, true));
  ds.mul_(scale);
  auto dq = xtMatmul(ds, k);
  auto dk = xtMatmul(ds.transpose(-2, -1), q);
  // broadcast batch/head dims of k, v back to their own shapes
  auto reduceTo = [](at::Tensor g, const at::Tensor& ref) {
    if (g.sizes() == ref.sizes()) return g;
    std::vector<int64_t> dims;
    int64_t off = g.dim() - ref.dim();
    for (int64_t d = 0; d < g.dim(); d++)
      if (d < off || (ref.size(d - off) == 1 && g.size(d) != 1)) dims.push_back(d);
    return g.sum(dims, true).reshape(ref.sizes());
  };
  return idList(info, {reduceTo(dq, q), reduceTo(dk, k), reduceTo(dv, v)});
}

// ---------------------------------------------------------------------------------------------
// fused layer pieces: LayerNorm (no bias), exact GELU, rotary embedding

// x: [..., d], gamma: [d] -> (x - mean) / sqrt(var + eps) * (gamma + offset), biased variance.
XT_FN(LayerNorm) {
  const at::Tensor& x = get(info[0]);
  const at::Tensor& gamma = get(info[1]);
  double eps = dbl(info, 2);
  double offset = dbl(info, 3);
  at::Tensor w = offset != 0.0 ? gamma + offset : gamma;
  return idv(info, at::layer_norm(x, {x.size(-1)}, w, {}, eps));
}

// dy, x: [..., d], gamma: [d] -> [dx, dgamma] of LayerNorm (mean and rstd recomputed).
XT_FN(LayerNormGrad) {
  const at::Tensor& dy = get(info[0]);
  const at::Tensor& x = get(info[1]);
  const at::Tensor& gamma = get(info[2]);
  double eps = dbl(info, 3);
  double offset = dbl(info, 4);
  at::Tensor w = offset != 0.0 ? gamma + offset : gamma;
  std::vector<int64_t> norm{x.size(-1)};
  auto xc = x.contiguous();
  auto fwd = at::native_layer_norm(xc, norm, w, {}, eps);
  auto g = at::native_layer_norm_backward(dy.contiguous(), xc, norm, std::get<1>(fwd), std::get<2>(fwd), w, {},
                                          {true, true, false});
  return idList(info, {std::get<0>(g), std::get<1>(g)});
}

// dy, x: any shape -> dx of the exact (erf) GELU.
XT_FN(GeluGrad) {
  // in bfloat16 where both are (GELU of a product's result, and the gradient from the next product)
  const at::Tensor& dy = getLow(info[0]);
  const at::Tensor& x = getLow(info[1]);
  if (dy.scalar_type() == x.scalar_type()) return idv(info, at::gelu_backward(dy, x));
  return idv(info, at::gelu_backward(get(info[0]), get(info[1])));
}

// Rotary embedding with pair tables: x [b, h, n, w]; cos, sin broadcastable to x with the last axis
// whole (sin holds the sign of the pair rotation). forward: y = x * cos + swap(x) * sin, where swap
// exchanges features 2i and 2i+1; transpose (its gradient): y = x * cos + swap(x * sin).
#if defined(__x86_64__)
// Features [0, w - w % 8) of rotatePairs, eight at a time: each feature gets the same two products
// and one sum as the scalar loop (no fused multiply-add), so the same numbers; pairs never straddle
// a block of eight, so y may be x. Returns the features done.
__attribute__((target("avx2"))) int64_t rotatePairs8(const float* xr, const float* cr, const float* sr, float* yr,
                                                   int64_t w, bool transpose) {
  int64_t j = 0;
  for (; j + 8 <= w; j += 8) {
    __m256 x = _mm256_loadu_ps(xr + j), s = _mm256_loadu_ps(sr + j);
    __m256 xs = _mm256_permute_ps(x, 0xB1);  // features 2i and 2i + 1 exchanged
    if (transpose) s = _mm256_permute_ps(s, 0xB1);
    _mm256_storeu_ps(yr + j, _mm256_add_ps(_mm256_mul_ps(x, _mm256_loadu_ps(cr + j)), _mm256_mul_ps(xs, s)));
  }
  return j;
}
#endif

// One vector of w features (w even): y = x * c + swap(x) * s, or (transpose) x * c + swap(x * s).
inline void rotatePairs(const float* xr, const float* cr, const float* sr, float* yr, int64_t w, bool transpose) {
  int64_t j0 = 0;
#if defined(__x86_64__)
  if (g_avx2) j0 = rotatePairs8(xr, cr, sr, yr, w, transpose);
#endif
  if (!transpose) {
    for (int64_t j = j0; j < w; j += 2) {
      yr[j] = xr[j] * cr[j] + xr[j + 1] * sr[j];
      yr[j + 1] = xr[j + 1] * cr[j + 1] + xr[j] * sr[j + 1];
    }
  } else {
    for (int64_t j = j0; j < w; j += 2) {
      yr[j] = xr[j] * cr[j] + xr[j + 1] * sr[j + 1];
      yr[j + 1] = xr[j + 1] * cr[j + 1] + xr[j] * sr[j];
    }
  }
}

#if defined(__x86_64__)
// n keys (rows kPos floats apart, w features, w % 16 == 0) each turned by its table rows (cos at
// c + j * cs, sin at s + j * ss) into out (rows of w): rotatePairs's products and sum, sixteen
// features at a time. Rounded as written (embedded rounding to nearest: no fused multiply-add).
__attribute__((target("avx512f"))) void turnKeys512(const float* k, int64_t kPos, int64_t n, int64_t w,
                                                    const float* c, int64_t cs, const float* s, int64_t ss,
                                                    float* out) {
  constexpr int rn = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t j = 0; j < n; j++) {
    const float *xr = k + j * kPos, *cr = c + j * cs, *sr = s + j * ss;
    float* yr = out + j * w;
    for (int64_t f = 0; f < w; f += 16) {
      __m512 x = _mm512_loadu_ps(xr + f);
      __m512 xs = _mm512_permute_ps(x, 0xB1);  // features 2i and 2i + 1 exchanged
      __m512 a = _mm512_mul_round_ps(x, _mm512_loadu_ps(cr + f), rn);
      __m512 b = _mm512_mul_round_ps(xs, _mm512_loadu_ps(sr + f), rn);
      _mm512_storeu_ps(yr + f, _mm512_add_round_ps(a, b, rn));
    }
  }
}
#endif

// n keys (rows kPos floats apart, w features) each turned as rotatePairs turns it, by its table rows
// (cos at c + j * cs, sin at s + j * ss), into out (rows of w)
void turnKeys(const float* k, int64_t kPos, int64_t n, int64_t w, const float* c, int64_t cs, const float* s,
              int64_t ss, float* out) {
#if defined(__x86_64__)
  if (g_avx512 && w % 16 == 0) return turnKeys512(k, kPos, n, w, c, cs, s, ss, out);
#endif
  for (int64_t j = 0; j < n; j++) rotatePairs(k + j * kPos, c + j * cs, s + j * ss, out + j * w, w, false);
}

at::Tensor rotaryApply(const at::Tensor& x, const at::Tensor& c0, const at::Tensor& s0, bool transpose) {
  int64_t w = x.size(-1);
  bool fast = x.dim() == 4 && x.device().is_cpu() && x.scalar_type() == at::kFloat && c0.scalar_type() == at::kFloat &&
              s0.scalar_type() == at::kFloat && c0.device().is_cpu() && s0.device().is_cpu() && w % 2 == 0 &&
              c0.size(-1) == w && s0.size(-1) == w && c0.dim() <= 4 && s0.dim() <= 4;
  if (!fast) {
    auto swap = [w](const at::Tensor& t) {
      auto sizes = t.sizes().vec();
      sizes.back() = w / 2;
      sizes.push_back(2);
      return t.reshape(sizes).flip(-1).reshape(t.sizes());
    };
    return transpose ? x * c0 + swap(x * s0) : x * c0 + swap(x) * s0;
  }
  // x is read in place where its features are contiguous (a window of a cache's buffer, say)
  at::Tensor xc = x.stride(3) == 1 || w == 1 ? x : x.contiguous();
  at::Tensor c = c0.expand(xc.sizes());
  at::Tensor s = s0.expand(xc.sizes());
  if (c.stride(3) != 1) c = c.contiguous();
  if (s.stride(3) != 1) s = s.contiguous();
  int64_t B = xc.size(0), H = xc.size(1), N = xc.size(2);
  at::Tensor y = at::empty({B, H, N, w}, xc.options());
  const float* px = xc.data_ptr<float>();
  const float* pc = c.data_ptr<float>();
  const float* ps = s.data_ptr<float>();
  float* py = y.data_ptr<float>();
  const int64_t xs0 = xc.stride(0), xs1 = xc.stride(1), xs2 = xc.stride(2);
  const int64_t cs0 = c.stride(0), cs1 = c.stride(1), cs2 = c.stride(2);
  const int64_t ss0 = s.stride(0), ss1 = s.stride(1), ss2 = s.stride(2);
  for (int64_t bi = 0; bi < B; bi++)
    for (int64_t hi = 0; hi < H; hi++)
      for (int64_t ni = 0; ni < N; ni++) {
        const float* xr = px + bi * xs0 + hi * xs1 + ni * xs2;
        float* yr = py + ((bi * H + hi) * N + ni) * w;
        const float* cr = pc + bi * cs0 + hi * cs1 + ni * cs2;
        const float* sr = ps + bi * ss0 + hi * ss1 + ni * ss2;
        rotatePairs(xr, cr, sr, yr, w, transpose);
      }
  return y;
}

XT_FN(Rotary) { return idv(info, rotaryApply(get(info[0]), get(info[1]), get(info[2]), flag(info, 3))); }

// A bfloat16 copy of a buffer's first `done` positions (bf16 mode), made from `source`'s storage.
struct LowCopy {
  c10::weak_intrusive_ptr<c10::StorageImpl> source{c10::intrusive_ptr<c10::StorageImpl>()};
  at::Tensor low;
  int64_t done = 0;
};

// Appending one position to a key/value cache ([b, h, t, d] along dim 2) without copying the t
// cached ones each step: the result is a view of t + 1 consecutive positions of a buffer with room
// for more. A cache that is such a view (from the buffer's start, or a window of its last positions,
// as decoding past maxSeqLen keeps), and after whose last position nothing has been written, gets
// the new position written in place (the old view's values are untouched, so tensors stay
// immutable); any other gets a new buffer with room for as many positions again. The same on
// any device: on a GPU the write is queued after the kernels that read the earlier views, none of
// which reads the new position.
struct AppendBuffer {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  int64_t used;
  // for a key buffer: its first `rotatedUsed` positions rotated (rotary), in a buffer of the same
  // capacity that only this code reads
  at::Tensor rotated;
  int64_t rotatedUsed = 0;
  // bfloat16 copies of the buffer and of its rotated keys (see lowWindow)
  LowCopy low, rotatedLow;
};
std::unordered_map<const void*, AppendBuffer> g_appendBuffers;

// The live append buffer that t is a view of (whatever its positions), or null.
AppendBuffer* trackedBuffer(const at::Tensor& t) {
  if (!t.has_storage()) return nullptr;
  auto it = g_appendBuffers.find(t.storage().data());
  if (it == g_appendBuffers.end() || it->second.storage.lock().get() != t.storage().unsafeGetStorageImpl())
    return nullptr;
  return &it->second;
}

// How many positions a new append buffer for t + 1 of them has room for: twice as many, at least 16
// (a row decoding n tokens after its prompt is copied into a larger buffer about log2(n) times).
int64_t appendCapacity(int64_t t) { return std::max<int64_t>(2 * (t + 1), 16); }

// Records a new append buffer with `used` positions written (and its rotated keys, if any);
// buffers that died take their rotated keys with them here (a run holds a few per layer).
void trackAppendBuffer(const at::Tensor& buffer, int64_t used, at::Tensor rotated, int64_t rotatedUsed) {
  for (auto e = g_appendBuffers.begin(); e != g_appendBuffers.end();)
    e = e->second.storage.expired() ? g_appendBuffers.erase(e) : std::next(e);
  g_appendBuffers.erase(buffer.storage().data());
  g_appendBuffers.emplace(buffer.storage().data(), AppendBuffer{buffer.storage().getWeakStorageImpl(), used,
                                                                std::move(rotated), rotatedUsed});
}

// The append buffer that a cache ([b, h, t, d]) is t consecutive positions of, from position
// start = storage offset / d, when its next position can be written in place (the buffer has room
// and nothing was written after it).
AppendBuffer* appendableBuffer(const at::Tensor& cache) {
  if (cache.dim() != 4) return nullptr;
  int64_t h = cache.size(1), t = cache.size(2), d = cache.size(3);
  if (!(cache.has_storage() && cache.stride(3) == 1 && cache.stride(2) == d && d > 0 &&
        cache.storage_offset() % d == 0))
    return nullptr;
  int64_t cap = cache.stride(1) / d, start = cache.storage_offset() / d;
  if (cap <= start + t || cache.stride(1) != cap * d || cache.stride(0) != h * cap * d) return nullptr;
  AppendBuffer* buf = trackedBuffer(cache);
  return buf && buf->used == start + t ? buf : nullptr;
}

at::Tensor appendPosition(const at::Tensor& cache, const at::Tensor& x) {
  int64_t b = cache.size(0), h = cache.size(1), t = cache.size(2), d = cache.size(3);
  if (cache.scalar_type() == x.scalar_type()) {
    if (AppendBuffer* buf = appendableBuffer(cache)) {
      int64_t start = cache.storage_offset() / d;
      auto full = cache.as_strided({b, h, t + 1, d}, cache.strides(), cache.storage_offset());
      if (x.device().is_cpu() && x.scalar_type() == at::kFloat && (x.stride(3) == 1 || d == 1)) {
        // the new position, row by row, without a tensor op
        float* dst = full.data_ptr<float>();
        const float* src = x.data_ptr<float>();
        for (int64_t bi = 0; bi < b; bi++)
          for (int64_t hi = 0; hi < h; hi++)
            std::memcpy(dst + bi * full.stride(0) + hi * full.stride(1) + t * d,
                        src + bi * x.stride(0) + hi * x.stride(1), sizeof(float) * d);
      } else {
        full.narrow(2, t, 1).copy_(x);
      }
      buf->used = start + t + 1;
      return full;
    }
  }
  auto buffer = at::empty({b, h, appendCapacity(t), d}, cache.options());
  auto full = buffer.narrow(2, 0, t + 1);
  full.narrow(2, 0, t).copy_(cache);
  full.narrow(2, t, 1).copy_(x);
  trackAppendBuffer(buffer, t + 1, at::Tensor(), 0);
  return full;
}

// Rotary tables that the raw CPU loops can read: float32, [1|b, 1|h, positions, w] with unit
// feature stride.
bool rawTables(const at::Tensor& cos, const at::Tensor& sin, int64_t w) {
  return cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.device().is_cpu() &&
         sin.device().is_cpu() && w % 2 == 0 && cos.dim() == 4 && sin.dim() == 4 && cos.size(3) == w &&
         sin.size(3) == w && (cos.stride(3) == 1 || w == 1) && (sin.stride(3) == 1 || w == 1);
}

// The table row of (row bi, head hi) at position pos.
inline const float* tableRow(const at::Tensor& t, int64_t bi, int64_t hi, int64_t pos) {
  return t.data_ptr<float>() + (t.size(0) == 1 ? 0 : bi * t.stride(0)) + (t.size(1) == 1 ? 0 : hi * t.stride(1)) +
         pos * t.stride(2);
}

// The rotated keys of an appended key cache (kAll, from appendPosition), with tables (cos, sin) of
// at least its positions: rotating a key depends on its position alone, so the rotations of earlier
// steps are kept beside the buffer and only the new position is rotated; anything else rotates
// every key.
at::Tensor rotatedKeys(const at::Tensor& kAll, const at::Tensor& cos, const at::Tensor& sin) {
  int64_t t1 = kAll.size(2);
  if (cos.size(2) < t1 || sin.size(2) < t1)
    throw std::runtime_error("cachedAttention: rotary tables shorter than the keys");
  AppendBuffer* buf = trackedBuffer(kAll);
  bool tracked = buf && buf->used == t1;
  if (tracked && buf->rotated.defined() && buf->rotatedUsed == t1 - 1) {
    auto& r = buf->rotated;
    int64_t w = kAll.size(3);
    if (kAll.scalar_type() == at::kFloat && rawTables(cos, sin, w) && r.is_contiguous()) {
      // the new key of each row and head, rotated straight into the buffer (as rotaryApply does)
      int64_t b = kAll.size(0), h = kAll.size(1), cap = r.size(2);
      const float* pk = kAll.data_ptr<float>();
      float* pr = r.data_ptr<float>();
      for (int64_t bi = 0; bi < b; bi++)
        for (int64_t hi = 0; hi < h; hi++)
          rotatePairs(pk + bi * kAll.stride(0) + hi * kAll.stride(1) + (t1 - 1) * kAll.stride(2),
                      tableRow(cos, bi, hi, t1 - 1), tableRow(sin, bi, hi, t1 - 1),
                      pr + ((bi * h + hi) * cap + t1 - 1) * w, w, false);
    } else {
      r.narrow(2, t1 - 1, 1).copy_(rotaryApply(kAll.narrow(2, t1 - 1, 1), cos.narrow(2, t1 - 1, 1),
                                               sin.narrow(2, t1 - 1, 1), false));
    }
    buf->rotatedUsed = t1;
    return r.narrow(2, 0, t1);
  }
  auto all = rotaryApply(kAll, cos.narrow(2, 0, t1), sin.narrow(2, 0, t1), false);
  if (tracked) {
    int64_t cap = kAll.stride(1) / kAll.size(3);
    auto r = at::empty({kAll.size(0), kAll.size(1), cap, kAll.size(3)}, all.options());
    r.narrow(2, 0, t1).copy_(all);
    buf->rotated = r;
    buf->rotatedUsed = t1;
    return r.narrow(2, 0, t1);  // the same keys, as the kept ones (which bf16 mode keeps a copy of)
  }
  return all;
}

// q [b, h, 1, d] turned by the tables' position pos (as rotaryApply does), contiguous.
at::Tensor rotatedQuery(const at::Tensor& q, const at::Tensor& cos, const at::Tensor& sin, int64_t pos) {
  int64_t b = q.size(0), h = q.size(1), w = q.size(3);
  if (!(q.scalar_type() == at::kFloat && q.device().is_cpu() && (q.stride(3) == 1 || w == 1) &&
        rawTables(cos, sin, w)))
    return rotaryApply(q, cos.narrow(2, pos, 1), sin.narrow(2, pos, 1), false);
  auto y = at::empty({b, h, 1, w}, q.options());
  const float* pq = q.data_ptr<float>();
  float* py = y.data_ptr<float>();
  for (int64_t bi = 0; bi < b; bi++)
    for (int64_t hi = 0; hi < h; hi++)
      rotatePairs(pq + bi * q.stride(0) + hi * q.stride(1), tableRow(cos, bi, hi, pos), tableRow(sin, bi, hi, pos),
                  py + (bi * h + hi) * w, w, false);
  return y;
}

// Each float to its nearest bfloat16 value (ties to even; NaN stays NaN), as a float: what a
// conversion to bfloat16 and back gives.
void roundToBf16(float* x, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) u |= 0x00400000u;  // NaN: quiet, and kept NaN by the rounding
    else u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    std::memcpy(x + i, &u, 4);
  }
}

// Plain self-attention over n new positions that start or continue a key/value cache (a decoding
// step, a prompt's prefill), as the library's ops would run it (the same kernels in the same order,
// so the same numbers):
//   q, k, v = x Wq^T, x Wk^T, x Wv^T split into heads; k, v appended to the cache;
//   q rotated with (cosQ, sinQ) and all keys with (cos, sin) when tables are given (ids >= 0);
//   softmax(q k^T * scale) v over the keys (right-aligned causal mask when causal and n > 1);
//   heads merged; times Wo^T.
// args: x [b, n, dim], wq, wk, wv, wo, kCache [b, h, t, d], vCache [b, h, t, dv] (ids, or -1 for
// none: t = 0), cos, sin, cosQ, sinQ (ids or -1), scale, heads, causal, flash -> [out [b, n, dimOut],
// k [b, h, t + n, d], v [b, h, t + n, dv], the new v [b, h, n, dv]].
// Scratch memory of the decoding kernels (each thread its own: the helpers run them too).
thread_local std::vector<float> g_scratch;
float* scratch(size_t n) {
  if (g_scratch.size() < n) g_scratch.resize(n);
  return g_scratch.data();
}

// Where the raw loops of a decoding step apply: CPU float32 keys and values of one query position,
// with unit feature strides, and the small-row product kernels.
bool rawAttend(const at::Tensor& k, const at::Tensor& v, bool lowValues = false) {
  return g_sgemm && smallGemvFor(1) && (!g_bf16 || lowValues) && k.device().is_cpu() && v.device().is_cpu() &&
         k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat && k.size(2) > 0 &&
         (k.stride(3) == 1 || k.size(3) == 1) && k.stride(2) >= k.size(3) && (v.stride(3) == 1 || v.size(3) == 1) &&
         v.stride(2) >= v.size(3);
}

// Scores this many or fewer (heads times keys, per row) take the softmax below; more take ATen's
// vectorized one. Either way a row's numbers depend on its own length alone.
constexpr int64_t kLoopSoftmax = 8192;

// Keys turned on the fly, a block at a time (each thread its own block: the helpers run them too).
thread_local std::vector<float> g_turnedKeys;
constexpr int64_t kTurnedBlock = 32;

// The scores q k_j^T of t keys (rows kPos floats apart) that are first turned by their table rows
// (cos at c + j * cs, sin at s + j * ss), as rotaryApply turns them: a block of keys is turned into
// scratch memory and scored there (by scores256 with `sixteen`, else gemvT), so each score is the
// one of turning every key first and then scoring them, without writing the turned keys out.
void scoresOfTurnedKeys(const float* q, const float* k, int64_t kPos, int64_t t, int64_t d, const float* c,
                        int64_t cs, const float* s, int64_t ss, float* sr, bool sixteen) {
  if (static_cast<int64_t>(g_turnedKeys.size()) < kTurnedBlock * d) g_turnedKeys.resize(kTurnedBlock * d);
  float* turned = g_turnedKeys.data();
  for (int64_t j0 = 0; j0 < t; j0 += kTurnedBlock) {
    const int64_t nb = std::min(kTurnedBlock, t - j0);
    turnKeys(k + j0 * kPos, kPos, nb, d, c + j0 * cs, cs, s + j0 * ss, ss, turned);
#if defined(__x86_64__)
    if (sixteen) {
      scores256(q, turned, d, nb, d, sr + j0);
      continue;
    }
#endif
    gemvT(1, nb, d, q, d, turned, d, sr + j0, t);
  }
}

// The scores of one query (one head) over t keys on the fast kernels (where fastScores(d)), each key
// first turned by its table rows (cos at c + j * cs, sin at s + j * ss) when c is given: on AVX-512
// in registers, on AVX2 in scratch memory (turnKeys gives the numbers scores512 turns them to).
void scoreKeys(const float* q, const float* k, int64_t kPos, int64_t t, int64_t d, const float* c, int64_t cs,
               const float* s, int64_t ss, float* out) {
#if defined(__x86_64__)
  if (g_avx512) {
    if (c) scores512<true>(q, k, kPos, t, d, c, cs, s, ss, out);
    else scores512<false>(q, k, kPos, t, d, nullptr, 0, nullptr, 0, out);
  } else if (c) {
    scoresOfTurnedKeys(q, k, kPos, t, d, c, cs, s, ss, out, true);
  } else {
    scores256(q, k, kPos, t, d, out);
  }
#endif
}

// softmax(q k^T * scale) v of one query per row and head, heads merged: q points at b rows of h
// heads of d features (strides qRow, qHead), k [b, h, t, d] (rotated, or turned here by keyCos and
// keySin's positions 0 .. t - 1 when they are given), v [b, h, t, dv] -> out, b rows of h * dv.
// Scores and weighted sums on the small-row kernels; for head widths that are multiples of 16, the
// scores and the softmax on sixteen lanes (scoreKeys, softmaxRowFast).
void attendRawPtr(const float* q, int64_t qRow, int64_t qHead, int64_t b, int64_t h, int64_t t, int64_t d,
                  int64_t dv, const float* pk, int64_t kRow, int64_t kHead, int64_t kPos, const float* pv, int64_t vRow,
                  int64_t vHead, int64_t vPos, double scale, float* out, const at::Tensor* keyCos = nullptr,
                  const at::Tensor* keySin = nullptr, bool low = false) {
  const float sc = static_cast<float>(scale);
  float* ps = scratch(b * h * t);
  // the sixteen-lane scores and softmax (the scalar loops below otherwise)
  const bool fast = fastScores(d);
  for (int64_t bi = 0; bi < b; bi++)
    for (int64_t hi = 0; hi < h; hi++) {
      float* sr = ps + (bi * h + hi) * t;
      const float *qh = q + bi * qRow + hi * qHead, *kh = pk + bi * kRow + hi * kHead;
      // the keys' table rows from position 0, where they are turned here
      const float* c = keyCos ? tableRow(*keyCos, bi, hi, 0) : nullptr;
      const float* s = keyCos ? tableRow(*keySin, bi, hi, 0) : nullptr;
      const int64_t cs = keyCos ? keyCos->stride(2) : 0, ss = keyCos ? keySin->stride(2) : 0;
      if (fast) scoreKeys(qh, kh, kPos, t, d, c, cs, s, ss, sr);
      else if (c) scoresOfTurnedKeys(qh, kh, kPos, t, d, c, cs, s, ss, sr, false);
      else gemvT(1, t, d, qh, d, kh, kPos, sr, t);
      if (low) roundToBf16(sr, t);  // a bfloat16 product's result
      scaleRow(sr, t, sc);
    }
  if (h * t > kLoopSoftmax) {
    auto s = at::from_blob(ps, {b * h, t}, at::TensorOptions().dtype(at::kFloat));
    s.copy_(at::softmax(s, -1));
  } else {
    for (int64_t r = 0; r < b * h; r++) {
      float* sr = ps + r * t;
      if (fast) {
        softmaxRowFast(sr, t);
        continue;
      }
      const float mx = maxRow(sr, t);
      float sum = 0;
      for (int64_t j = 0; j < t; j++) sum += (sr[j] = std::exp(sr[j] - mx));
      divideRow(sr, t, sum);
    }
  }
  if (low) roundToBf16(ps, b * h * t);  // the weights as a bfloat16 product's operand
  const bool pairs = fastWeighValues(dv);
  for (int64_t bi = 0; bi < b; bi++)
    for (int64_t hi = 0; hi < h; hi += pairs ? 2 : 1) {
      const int heads = pairs && hi + 1 < h ? 2 : 1;
      float* o = out + (bi * h + hi) * dv;
      if (pairs) weighValues(heads, ps + (bi * h + hi) * t, t, pv + bi * vRow + hi * vHead, vHead, vPos, t, dv, o);
      else gemvN(1, dv, t, ps + (bi * h + hi) * t, t, pv + bi * vRow + hi * vHead, vPos, o, dv);
      if (low) roundToBf16(o, heads * dv);
    }
}

void attendRaw(const float* q, int64_t qRow, int64_t qHead, int64_t b, int64_t h, const at::Tensor& k,
               const at::Tensor& v, double scale, float* out, bool low = false) {
  attendRawPtr(q, qRow, qHead, b, h, k.size(2), k.size(3), v.size(3), k.data_ptr<float>(), k.stride(0), k.stride(1),
               k.stride(2), v.data_ptr<float>(), v.stride(0), v.stride(1), v.stride(2), scale, out, nullptr, nullptr,
               low);
}

// The same for q [b, h, 1, d] as a tensor, merged into [b, 1, h * dv] (or into `into`, rows
// [row0, row0 + b)); outside the raw loops' reach, attentionForward's composite.
// With `lowValues` (bf16 mode), k and v hold bfloat16 values as floats (kept copies, see lowWindow):
// the raw loops then compute what the composite's bfloat16 products do, rounding the query, the
// scores, the weights and the result to bfloat16 values where those products would.
at::Tensor attendOneQuery(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                          at::Tensor* into = nullptr, int64_t row0 = 0, bool lowValues = false) {
  int64_t b = q.size(0), h = q.size(1), d = q.size(3), dv = v.size(3);
  const bool low = g_bf16 && lowValues;
  bool raw = rawAttend(k, v, low) && q.device().is_cpu() && q.scalar_type() == at::kFloat && q.size(2) == 1 &&
             k.size(1) == h && v.size(1) == h && v.size(2) == k.size(2) && k.size(3) == d &&
             (q.stride(3) == 1 || d == 1);
  if (!raw) {
    auto merged = attentionForward(q, k, v, nullptr, scale, true).permute({0, 2, 1, 3}).reshape({b, 1, h * dv});
    if (!into) return merged;
    into->narrow(0, row0, b).copy_(merged);
    return *into;
  }
  at::Tensor out = into ? *into : at::empty({b, 1, h * dv}, k.options());
  if (low) {
    // the query's bfloat16 values, rows of h heads of d features
    at::Tensor ql = bf16Values(q.reshape({b, h * d})).contiguous();
    attendRaw(ql.data_ptr<float>(), h * d, d, b, h, k, v, scale, out.data_ptr<float>() + (into ? row0 * h * dv : 0),
              true);
    return out;
  }
  attendRaw(q.data_ptr<float>(), q.stride(0), q.stride(1), b, h, k, v, scale,
            out.data_ptr<float>() + (into ? row0 * h * dv : 0));
  return out;
}

// The attention of one decoding step after the projections: q, k, v [b, h, 1, *] (this step's),
// k and v appended to the caches, q and the keys rotated with (cosQ, sinQ) and (cos, sin) when
// given. Returns the heads merged [b, 1, h * dv] (or writes them into `into`) and the new caches.
struct StepAttention {
  at::Tensor merged, kAll, vAll;
};

// In bf16 mode, the bfloat16 copy of `view`, a window of positions of the append buffer `cache` is a
// view of, or of that buffer's rotated keys ([b, h, cap, d] contiguous): a copy kept beside the
// buffer, extended by the positions written since its last use (a buffer's positions, once written,
// never change), so that a cached step's products read the cache's bfloat16 values without
// converting every position again (the same values: the conversion is elementwise). Anything else
// is returned as it is (the products convert it).
at::Tensor lowWindow(const at::Tensor& view, const at::Tensor& cache) {
  if (!g_bf16 || view.dim() != 4 || view.scalar_type() != at::kFloat || !view.has_storage()) return view;
  const int64_t b = view.size(0), h = view.size(1), t = view.size(2), d = view.size(3);
  if (d == 0 || t == 0 || view.stride(3) != 1 || view.stride(2) != d || view.storage_offset() % d != 0) return view;
  const int64_t cap = view.stride(1) / d, start = view.storage_offset() / d;
  if (view.stride(1) != cap * d || view.stride(0) != h * cap * d || start + t > cap) return view;
  AppendBuffer* tracked = trackedBuffer(cache);
  if (!tracked) return view;
  AppendBuffer& buf = *tracked;
  const c10::StorageImpl* impl = view.storage().unsafeGetStorageImpl();
  LowCopy* copy = nullptr;
  int64_t fixed = 0;
  if (impl == cache.storage().unsafeGetStorageImpl()) {
    copy = &buf.low;
    fixed = buf.used;
  } else if (buf.rotated.defined() && buf.rotated.storage().unsafeGetStorageImpl() == impl) {
    copy = &buf.rotatedLow;
    fixed = buf.rotatedUsed;
  }
  if (!copy || start + t > fixed) return view;
  const auto full = view.as_strided({b, h, cap, d}, view.strides(), 0);
  // where the raw loops run (the CPU), the bfloat16 values are kept as floats (see attendOneQuery)
  const at::ScalarType kept = rawAttend(view, view, true) ? at::kFloat : at::kBFloat16;
  if (copy->source.lock().get() != impl || !copy->low.defined() || copy->low.sizes() != full.sizes() ||
      copy->low.scalar_type() != kept) {
    copy->source = view.storage().getWeakStorageImpl();
    copy->low = at::empty(full.sizes(), full.options().dtype(kept));
    copy->done = 0;
  }
  if (copy->done < start + t) {
    const int64_t from = copy->done, n = start + t - from;
    const auto added = full.narrow(2, from, n);
    copy->low.narrow(2, from, n).copy_(kept == at::kFloat ? bf16Values(added) : added.to(at::kBFloat16));
    copy->done = start + t;
  }
  return copy->low.narrow(2, start, t);
}

StepAttention attendStep(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kc,
                         const at::Tensor& vc, const at::Tensor* cos, const at::Tensor* sin, double scale,
                         at::Tensor* into = nullptr, int64_t row0 = 0) {
  auto kAll = appendPosition(kc, k);
  auto vAll = appendPosition(vc, v);
  at::Tensor qr = q, kr = kAll;
  if (cos) {
    kr = rotatedKeys(kAll, *cos, *sin);
    // the new position is the last key's
    qr = rotatedQuery(q, *cos, *sin, kAll.size(2) - 1);
  }
  if (!g_bf16) return {attendOneQuery(qr, kr, vAll, scale, into, row0), kAll, vAll};
  // bf16 mode: the keys' and values' kept bfloat16 copies, where they have them
  at::Tensor kl = lowWindow(kr, kAll), vl = lowWindow(vAll, vAll);
  const bool kept = kl.unsafeGetTensorImpl() != kr.unsafeGetTensorImpl() &&
                    vl.unsafeGetTensorImpl() != vAll.unsafeGetTensorImpl() && kl.scalar_type() == at::kFloat &&
                    vl.scalar_type() == at::kFloat;
  return {attendOneQuery(qr, kl, vl, scale, into, row0, kept), kAll, vAll};
}

XT_FN(CachedAttention) {
  const at::Tensor& x = get(info[0]);
  const at::Tensor &wq = get(info[1]), &wk = get(info[2]), &wv = get(info[3]), &wo = get(info[4]);
  bool cached = num(info, 5) >= 0;
  bool rotary = num(info, 7) >= 0;
  double scale = dbl(info, 11);
  int64_t h = num(info, 12);
  int64_t b = x.size(0), n = x.size(1);
  auto heads = [&](const at::Tensor& t) { return t.view({b, n, h, t.size(-1) / h}).permute({0, 2, 1, 3}); };
  auto qkv = projectJoint(x, {wq, wk, wv});
  auto q = heads(qkv[0]), k = heads(qkv[1]), v = heads(qkv[2]);
  if (cached && n == 1) {
    const at::Tensor &kc = get(info[5]), &vc = get(info[6]);
    // (cosQ, sinQ, info[9] and info[10], are the tables' last position: the query's)
    StepAttention st;
    if (rotary) {
      const at::Tensor &cos = get(info[7]), &sin = get(info[8]);
      st = attendStep(q, k, v, kc, vc, &cos, &sin, scale);
    } else {
      st = attendStep(q, k, v, kc, vc, nullptr, nullptr, scale);
    }
    auto out = xtMatmul(st.merged, wo.transpose(0, 1));
    return idList(info, {out, st.kAll, st.vAll, v});
  }
  // several new positions (a prompt, or a chunk after the cache), or a first one: the new keys and
  // values after the cached ones, q rotated with (cosQ, sinQ) and every key with (cos, sin), then
  // the attention the layer's own path runs (flash: the fused kernel; else the dense composite)
  bool causal = flag(info, 13), flash = flag(info, 14);
  at::Tensor kAll = cached ? at::cat({get(info[5]), k}, 2) : k.contiguous();
  at::Tensor vAll = cached ? at::cat({get(info[6]), v}, 2) : v.contiguous();
  at::Tensor qr = q, kr = kAll;
  if (rotary) {
    qr = rotaryApply(q, get(info[9]), get(info[10]), false);
    kr = rotaryApply(kAll, get(info[7]), get(info[8]), false);
  }
  auto att = flash ? attentionForward(qr, kr, vAll, nullptr, scale, causal)
                   : denseAttention(qr, kr, vAll, nullptr, scale, causal);
  auto merged = att.permute({0, 2, 1, 3}).reshape({b, n, h * att.size(3)});
  auto out = xtMatmul(merged, wo.transpose(0, 1));
  return idList(info, {out, kAll, vAll, v.contiguous()});
}

// One decoding step of plain self-attention for rows that each continue their own cache (rows of
// different lengths decoded together): row r of x [b, 1, dim] appends to kCaches[r], vCaches[r]
// ([1, h, t_r, d], [1, h, t_r, dv]) and is rotated, when cos[r] >= 0, with the tables cos[r], sin[r]
// ([1, 1, >= t_r + 1, d], positions from 0) at position t_r. The projections run on all rows at
// once, the attention row by row; each row's numbers are those of XtCachedAttention on that row
// alone while the products keep rows apart (setSmallGemvRows >= b).
// -> [out [b, 1, dimOut], k_0, v_0, k_1, v_1, ...] (each row's caches with this step).
// One row's step of CachedAttentionRows on raw memory, where it applies: the row's key and value
// caches are append buffers with room for the new position (appendPosition's), the keys' rotations
// are tracked up to the last position (rotatedKeys') or the keys are a window of the buffer's last
// positions (turned on the fly), and everything is CPU float32 that the raw loops read. The new key
// and value are written in place and the new key rotated; the query is
// rotated into qRot (h * d floats). Then `attention` describes the rest, the same loops as
// attendStep's (so the same numbers) without a tensor op per head: RowAttention::run. Returns false
// (nothing written) where it does not apply; then attendStep runs.
// q, k, v: this row's projections (h heads of d, d, dv features, contiguous).
struct RowAttention {
  int64_t row;  // its row of the step
  const float* query;
  const float* keys;
  const float* values;
  int64_t positions, kcap, vcap;
  // what keys and values point into (the keys' rotated copy, or the caches)
  at::Tensor keysKeep, valuesKeep;
  // where defined, the keys are the cache's own and are turned here by these tables' positions from
  // 0 (a window of the cache's last positions, whose positions move by one each step)
  at::Tensor keyCos, keySin;
  // softmax(q k^T * scale) v for the row's h heads into out (h * dv floats)
  void run(int64_t h, int64_t d, int64_t dv, double scale, float* out) const {
    const bool turn = keyCos.defined();
    attendRawPtr(query, h * d, d, 1, h, positions, d, dv, keys, h * kcap * d, kcap * d, d, values, h * vcap * dv,
                 vcap * dv, dv, scale, out, turn ? &keyCos : nullptr, turn ? &keySin : nullptr);
  }
};

// A row's cache ([1, h, t, w] from its storage's start) copied into a new append buffer with room for
// more positions (appendCapacity): where its own buffer is full, or it is no buffer's (a
// prompt's keys). With tables (a key cache under rotary) the buffer's rotated keys come too: the old
// buffer's, where it kept them for these t positions, else every key turned here (as rotaryApply
// turns it). Returns the view of the t positions in the new buffer.
at::Tensor regrowBuffer(const at::Tensor& c, const at::Tensor* cos, const at::Tensor* sin) {
  const int64_t h = c.size(1), t = c.size(2), w = c.size(3);
  const int64_t cap = appendCapacity(t);
  at::Tensor rotated;
  if (cos) {
    rotated = at::empty({1, h, cap, w}, c.options());
    const AppendBuffer* old = trackedBuffer(c);
    const bool kept = old && old->used == t && old->rotatedUsed == t && old->rotated.defined();
    if (kept) {
      rotated.narrow(2, 0, t).copy_(old->rotated.narrow(2, 0, t));
    } else {
      float* pr = rotated.data_ptr<float>();
      const float* pc = c.data_ptr<float>();
      for (int64_t hi = 0; hi < h; hi++)
        for (int64_t pos = 0; pos < t; pos++)
          rotatePairs(pc + hi * c.stride(1) + pos * c.stride(2), tableRow(*cos, 0, hi, pos), tableRow(*sin, 0, hi, pos),
                      pr + (hi * cap + pos) * w, w, false);
    }
  }
  auto buffer = at::empty({1, h, cap, w}, c.options());
  auto view = buffer.narrow(2, 0, t);
  view.copy_(c);
  trackAppendBuffer(buffer, t, rotated, cos ? t : 0);
  return view;
}

bool attendRowInPlace(const float* q, const float* k, const float* v, int64_t dk, int64_t dvIn, const at::Tensor& kIn,
                      const at::Tensor& vIn, const at::Tensor* cos, const at::Tensor* sin, int64_t h, float* qRot,
                      RowAttention& attention, at::Tensor& kAll, at::Tensor& vAll) {
  if (!(g_sgemm && smallGemvFor(1) && !g_bf16)) return false;
  // one row's float32 CPU cache of h heads of w features
  auto rowCache = [&](const at::Tensor& c, int64_t w) {
    return c.dim() == 4 && c.size(0) == 1 && c.size(1) == h && c.size(3) == w && c.scalar_type() == at::kFloat &&
           c.device().is_cpu();
  };
  const int64_t d = kIn.size(3), dv = vIn.size(3), t = kIn.size(2);
  if (t < 1 || vIn.size(2) != t || d != dk || dv != dvIn || !rowCache(kIn, d) || !rowCache(vIn, dv)) return false;
  if (cos && !(rawTables(*cos, *sin, d) && cos->size(2) >= t + 1 && sin->size(2) >= t + 1)) return false;
  // buffers that take the new position in place, whose kept rotations are those of their positions
  // (from the buffer's start) or that are windows of their last positions (decoding past maxSeqLen:
  // the positions move by one each step, so the keys are turned on the fly, see RowAttention); a
  // full buffer, or a cache that is none (a prompt's), is copied into a larger one first
  AppendBuffer* kb = appendableBuffer(kIn);
  AppendBuffer* vb = appendableBuffer(vIn);
  const bool grow = !kb || !vb ||
                    (cos && kIn.storage_offset() == 0 && !(kb->rotated.defined() && kb->rotatedUsed == t));
  const at::Tensor kc = grow ? regrowBuffer(kIn, cos, sin) : kIn;
  const at::Tensor vc = grow ? regrowBuffer(vIn, nullptr, nullptr) : vIn;
  if (grow) {
    kb = appendableBuffer(kc);
    vb = appendableBuffer(vc);
  }
  if (!kb || !vb || kb == vb) return false;
  const int64_t kcap = kc.stride(1) / d, vcap = vc.stride(1) / dv;
  const int64_t kStart = kc.storage_offset() / d, vStart = vc.storage_offset() / dv;
  const bool turn = cos && kStart > 0;
  if (cos && !turn) {
    const auto& r = kb->rotated;
    if (!(r.defined() && kb->rotatedUsed == t && r.is_contiguous() && r.dim() == 4 && r.size(2) == kcap &&
          r.size(3) == d))
      return false;
  }
  float* pk = kc.data_ptr<float>();
  float* pv = vc.data_ptr<float>();
  for (int64_t hi = 0; hi < h; hi++) {
    std::memcpy(pk + (hi * kcap + t) * d, k + hi * d, sizeof(float) * d);
    std::memcpy(pv + (hi * vcap + t) * dv, v + hi * dv, sizeof(float) * dv);
  }
  kb->used = kStart + t + 1;
  vb->used = vStart + t + 1;
  const int64_t row = attention.row;
  attention = {row, q, pk, pv, t + 1, kcap, vcap, kc, vc, at::Tensor(), at::Tensor()};
  if (turn) {
    for (int64_t hi = 0; hi < h; hi++)
      rotatePairs(q + hi * d, tableRow(*cos, 0, hi, t), tableRow(*sin, 0, hi, t), qRot + hi * d, d, false);
    // a copy of turned keys no longer matches the buffer's positions
    kb->rotated = at::Tensor();
    kb->rotatedUsed = 0;
    attention.query = qRot;
    attention.keyCos = *cos;
    attention.keySin = *sin;
  } else if (cos) {
    float* pr = kb->rotated.data_ptr<float>();
    for (int64_t hi = 0; hi < h; hi++) {
      rotatePairs(pk + (hi * kcap + t) * d, tableRow(*cos, 0, hi, t), tableRow(*sin, 0, hi, t),
                  pr + (hi * kcap + t) * d, d, false);
      rotatePairs(q + hi * d, tableRow(*cos, 0, hi, t), tableRow(*sin, 0, hi, t), qRot + hi * d, d, false);
    }
    kb->rotatedUsed = t + 1;
    attention.keys = pr;
    attention.query = qRot;
    attention.keysKeep = kb->rotated;
  }
  kAll = kc.as_strided({1, h, t + 1, d}, kc.strides(), kc.storage_offset());
  vAll = vc.as_strided({1, h, t + 1, dv}, vc.strides(), vc.storage_offset());
  return true;
}

// the least work (multiply-adds over every row's positions) a step's attention shares with the
// helpers: its reads come from memory, slower per multiply-add than the products'
constexpr int64_t kShareAttentionMin = int64_t(1) << 16;

XT_FN(CachedAttentionRows) {
  const at::Tensor& x = get(info[0]);
  const at::Tensor &wq = get(info[1]), &wk = get(info[2]), &wv = get(info[3]), &wo = get(info[4]);
  auto kcs = tensorList(info[5]);
  auto vcs = tensorList(info[6]);
  auto cosIds = ints(info[7]);
  auto sinIds = ints(info[8]);
  double scale = dbl(info, 9);
  int64_t h = num(info, 10);
  int64_t b = x.size(0);
  if (x.dim() != 3 || x.size(1) != 1 || static_cast<int64_t>(kcs.size()) != b ||
      static_cast<int64_t>(vcs.size()) != b || static_cast<int64_t>(cosIds.size()) != b ||
      static_cast<int64_t>(sinIds.size()) != b)
    throw std::runtime_error("cachedAttentionRows: expected x [b, 1, dim] and b caches and tables");
  // the cache lines each row's new key and value will be written to (the position after its cache,
  // in its append buffer), fetched while the projections run: a step writes every row's next
  // position, and the buffer's lines there were never touched (a cache with no room after it, a
  // prompt's, is copied into a buffer instead: nothing to fetch)
  for (int64_t r = 0; r < b; r++)
    for (const at::Tensor* c : {&kcs[r], &vcs[r]}) {
      if (c->dim() != 4 || !c->device().is_cpu() || c->scalar_type() != at::kFloat || c->stride(3) != 1) continue;
      const int64_t end =
          c->storage_offset() + c->size(2) * c->stride(2) + (c->size(1) - 1) * c->stride(1) + c->size(3);
      if (end * int64_t(sizeof(float)) > static_cast<int64_t>(c->storage().nbytes())) continue;
      const char* base = static_cast<const char*>(c->data_ptr()) + c->size(2) * c->stride(2) * sizeof(float);
      for (int64_t hi = 0; hi < c->size(1); hi++)
        for (int64_t o = 0; o < c->size(3) * int64_t(sizeof(float)); o += 64)
          __builtin_prefetch(base + hi * c->stride(1) * sizeof(float) + o, 1, 3);
    }
  auto heads = [&](const at::Tensor& t) { return t.view({b, 1, h, t.size(-1) / h}).permute({0, 2, 1, 3}); };
  auto qkv = projectJoint(x, {wq, wk, wv});
  auto q = heads(qkv[0]), k = heads(qkv[1]), v = heads(qkv[2]);
  int64_t dv = v.size(3);
  auto merged = at::empty({b, 1, h * dv}, q.options());
  std::vector<at::Tensor> outs(1 + 2 * b);
  // the projections as raw rows (of any row stride: q, k and v may be columns of one product), where
  // the in-place path can read them
  auto rawRows = [&](const at::Tensor& t) {
    return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.stride(3) == 1 && t.stride(1) == t.size(3);
  };
  const bool raw = rawRows(q) && rawRows(k) && rawRows(v) && q.size(3) == k.size(3) && merged.is_contiguous();
  const int64_t d = q.size(3);
  // the rows that the in-place path takes: their caches written first, their attention after
  std::vector<RowAttention> planned;
  auto qRot = std::make_shared<std::vector<float>>(raw ? b * h * d : 0);
  int64_t work = 0;
  for (int64_t r = 0; r < b; r++) {
    const at::Tensor &kc = kcs[r], &vc = vcs[r];
    if (kc.dim() != 4 || kc.size(0) != 1 || vc.dim() != 4 || vc.size(0) != 1)
      throw std::runtime_error("cachedAttentionRows: expected the caches of one row each");
    const at::Tensor *cos = nullptr, *sin = nullptr;
    if (cosIds[r] >= 0) {
      cos = &getId(static_cast<int32_t>(cosIds[r]));
      sin = &getId(static_cast<int32_t>(sinIds[r]));
      if (cos->dim() != 4 || cos->size(2) < kc.size(2) + 1 || sin->sizes() != cos->sizes())
        throw std::runtime_error("cachedAttentionRows: rotary tables shorter than a row's next position");
    }
    RowAttention plan;
    plan.row = r;
    if (raw && attendRowInPlace(q.data_ptr<float>() + r * q.stride(0), k.data_ptr<float>() + r * k.stride(0),
                                v.data_ptr<float>() + r * v.stride(0), k.size(3), dv, kc, vc, cos, sin, h,
                                qRot->data() + r * h * d, plan, outs[1 + 2 * r], outs[2 + 2 * r])) {
      work += plan.positions * h * (d + dv);
      planned.push_back(std::move(plan));
      continue;
    }
    auto qr = q.narrow(0, r, 1), kr = k.narrow(0, r, 1), vr = v.narrow(0, r, 1);
    StepAttention st = attendStep(qr, kr, vr, kc, vc, cos, sin, scale, &merged, r);
    outs[1 + 2 * r] = st.kAll;
    outs[2 + 2 * r] = st.vAll;
  }
  float* pm = merged.data_ptr<float>();
  HelperPool* pool = planned.size() >= 2 && work >= kShareAttentionMin ? helpers() : nullptr;
  if (pool) {
    // a row per chunk; the job holds what the rows read: the queries (q, or the rotated copies in
    // qRot) and the keys and values (held by the rows)
    auto job = std::make_shared<SharedJob>();
    job->keep = {q};
    auto rows = std::make_shared<std::vector<RowAttention>>(std::move(planned));
    const int64_t width = h * dv;
    job->chunks = static_cast<int64_t>(rows->size());
    job->scratch.reset(new float[b * width]);
    job->run = [=, qRot = qRot](int64_t c, float* base) {
      const RowAttention& a = (*rows)[c];
      a.run(h, d, dv, scale, (base ? base : pm) + a.row * width);
    };
    job->collect = [=](int64_t c, const float* from) {
      const int64_t at = (*rows)[c].row * width;
      std::memcpy(pm + at, from + at, sizeof(float) * width);
    };
    pool->share(job);
  } else {
    for (const RowAttention& a : planned) a.run(h, d, dv, scale, pm + a.row * h * dv);
  }
  outs[0] = xtMatmul(merged, wo.transpose(0, 1));
  return idList(info, outs);
}

// ---------------------------------------------------------------------------------------------
// training pieces: cross-entropy with its backward, the AdamW update, seeded random fills

// logits: [N, C] float32, target: [N] int32 -> [losses [N] (0 where target == ignoreIndex),
// logp [N, C] (kept by the caller for the backward pass)].
XT_FN(CrossEntropy) {
  const at::Tensor& logits = get(info[0]);
  const at::Tensor& target = get(info[1]);
  int64_t ignore = static_cast<int64_t>(dbl(info, 2));
  if (logits.dim() != 2 || target.dim() != 1 || target.size(0) != logits.size(0))
    throw std::runtime_error("crossEntropy: expected logits [N, C] and target [N]");
  at::Tensor logp = at::log_softmax(logits, 1);
  at::Tensor t = target.to(at::kLong);
  at::Tensor valid = t.ne(ignore);
  at::Tensor safe = at::where(valid, t, at::zeros({}, t.options()));
  int64_t c = logits.size(1);
  at::Tensor losses;
  if (logits.device().is_cpu()) {
    if (safe.numel() > 0 && (safe.min().item<int64_t>() < 0 || safe.max().item<int64_t>() >= c))
      throw std::runtime_error("crossEntropy: target ids must be in [0, " + std::to_string(c) + ") or ignoreIndex");
    at::Tensor picked = logp.gather(1, safe.unsqueeze(1)).squeeze(1);
    losses = at::where(valid, picked.neg(), at::zeros({}, picked.options()));
  } else {
    // on a GPU the range check would wait for the device every step: an id out of range gives a
    // NaN loss for its row instead (and a gather index that cannot fault)
    at::Tensor inRange = safe.ge(0).logical_and_(safe.lt(c));
    at::Tensor picked = logp.gather(1, safe.clamp(0, c - 1).unsqueeze(1)).squeeze(1);
    losses = at::where(valid, at::where(inRange, picked.neg(), at::full({}, NAN, picked.options())),
                       at::zeros({}, picked.options()));
  }
  return idList(info, {losses, logp});
}

// dy: [N] (gradient of the per-row losses), logp: [N, C], target: [N] int32 ->
// dlogits = (exp(logp) - onehot(target)) * dy[:, None], zero on ignored rows.
XT_FN(CrossEntropyGrad) {
  const at::Tensor& dy = get(info[0]);
  const at::Tensor& logp = get(info[1]);
  const at::Tensor& target = get(info[2]);
  int64_t ignore = static_cast<int64_t>(dbl(info, 3));
  at::Tensor t = target.to(at::kLong);
  at::Tensor valid = t.ne(ignore);
  at::Tensor scale = at::where(valid, dy, at::zeros({}, dy.options())).unsqueeze(1);
  at::Tensor safe = at::where(valid, t, at::zeros({}, t.options())).unsqueeze(1);
  at::Tensor g = at::exp(logp);
  g.mul_(scale);
  if (!g.device().is_cpu()) safe = safe.clamp(0, g.size(1) - 1);
  g.scatter_add_(1, safe, scale.neg());
  return idv(info, g);
}

struct AdamWStep {
  float b1, b2, omb1, omb2, eps, step, sbc2, dfac;
  bool decay;
};

// elements [lo, hi) of one AdamW update; every step rounded to float32 in the order of TF.js's ops
inline void adamWScalar(const AdamWStep& s, int64_t lo, int64_t hi, const float* pp, const float* pg,
                        const float* pm, const float* pv, float* op, float* om, float* ov) {
  for (int64_t j = lo; j < hi; j++) {
    float gj = pg[j];
    float mj = pm[j] * s.b1 + gj * s.omb1;
    float g2 = gj * gj;
    float vj = pv[j] * s.b2 + g2 * s.omb2;
    float base = s.decay ? pp[j] * s.dfac : pp[j];
    float denom = std::sqrt(vj) / s.sbc2 + s.eps;
    op[j] = base - (mj / denom) * s.step;
    om[j] = mj;
    ov[j] = vj;
  }
}

#if defined(__x86_64__)
// the same operations eight lanes at a time (IEEE mul, add, sqrt and div round each lane exactly
// as the scalar code; no fused multiply-add, which would round once instead of twice)
__attribute__((target("avx2"))) void adamWAvx2(const AdamWStep& s, int64_t lo, int64_t hi, const float* pp,
                                               const float* pg, const float* pm, const float* pv, float* op, float* om,
                                               float* ov) {
  const __m256 b1 = _mm256_set1_ps(s.b1), b2 = _mm256_set1_ps(s.b2), omb1 = _mm256_set1_ps(s.omb1),
               omb2 = _mm256_set1_ps(s.omb2), eps = _mm256_set1_ps(s.eps), step = _mm256_set1_ps(s.step),
               sbc2 = _mm256_set1_ps(s.sbc2), dfac = _mm256_set1_ps(s.dfac);
  int64_t j = lo;
  for (; j + 8 <= hi; j += 8) {
    __m256 g = _mm256_loadu_ps(pg + j);
    __m256 m = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(pm + j), b1), _mm256_mul_ps(g, omb1));
    __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(pv + j), b2), _mm256_mul_ps(_mm256_mul_ps(g, g), omb2));
    __m256 base = _mm256_loadu_ps(pp + j);
    if (s.decay) base = _mm256_mul_ps(base, dfac);
    __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), sbc2), eps);
    _mm256_storeu_ps(op + j, _mm256_sub_ps(base, _mm256_mul_ps(_mm256_div_ps(m, denom), step)));
    _mm256_storeu_ps(om + j, m);
    _mm256_storeu_ps(ov + j, v);
  }
  adamWScalar(s, j, hi, pp, pg, pm, pv, op, om, ov);
}
#endif

void adamWRange(const AdamWStep& s, int64_t lo, int64_t hi, const float* pp, const float* pg, const float* pm,
                const float* pv, float* op, float* om, float* ov) {
#if defined(__x86_64__)
  if (g_avx2) return adamWAvx2(s, lo, hi, pp, pg, pm, pv, op, om, ov);
#endif
  adamWScalar(s, lo, hi, pp, pg, pm, pv, op, om, ov);
}

// One AdamW step over many parameters, in one pass over each parameter's memory.
// args: params, grads, m, v (id lists), decay (0/1 list), exclusive (0/1 list: JavaScript holds
// p, m and v nowhere else), beta1, beta2, eps, stepSize, sqrtBc2, decayFactor -> [p', m', v', ...]
// per parameter, each step rounded to float32 as TF.js's ops would:
//   m' = m b1 + g (1 - b1);  v' = v b2 + g^2 (1 - b2);  base = decay ? p decayFactor : p
//   p' = base - (m' / (sqrt(v') / sqrtBc2 + eps)) stepSize
// An exclusive parameter whose p, m and v own their storage alone is updated in place (as torch's
// optimizers do), and its three ids come back as -1; any other gets new tensors.
XT_FN(AdamW) {
  // what may be updated in place is read as stored (widened to float32 where it was bfloat16)
  auto widened = [](const Napi::Value& v) {
    std::vector<at::Tensor> out;
    for (int64_t id : ints(v)) out.push_back(widenedId(static_cast<int32_t>(id)));
    return out;
  };
  auto ps = widened(info[0]);
  auto gs = tensorList(info[1]);
  auto ms = widened(info[2]);
  auto vs = widened(info[3]);
  auto decay = ints(info[4]);
  auto exclusive = ints(info[5]);
  const float b1 = static_cast<float>(dbl(info, 6)), b2 = static_cast<float>(dbl(info, 7));
  const float omb1 = static_cast<float>(1.0 - dbl(info, 6)), omb2 = static_cast<float>(1.0 - dbl(info, 7));
  const float eps = static_cast<float>(dbl(info, 8)), step = static_cast<float>(dbl(info, 9));
  const float sbc2 = static_cast<float>(dbl(info, 10)), dfac = static_cast<float>(dbl(info, 11));
  size_t n = ps.size();
  if (gs.size() != n || ms.size() != n || vs.size() != n || decay.size() != n || exclusive.size() != n)
    throw std::runtime_error("adamW: expected as many grads, moments and flags as params");
  auto env = info.Env();
  auto result = Napi::Array::New(env, 3 * n);
  auto owned = [](const at::Tensor& t) {
    return t.is_contiguous() && t.storage().use_count() == 1 && t.storage_offset() == 0;
  };
  auto separate = [](const at::Tensor& p, const at::Tensor& m, const at::Tensor& v) {
    return p.storage().data() != m.storage().data() && p.storage().data() != v.storage().data() &&
           m.storage().data() != v.storage().data();
  };
  // Parameters on a GPU that may be updated in place: a few multi-tensor (foreach) ops update
  // all of them, a handful of kernel launches instead of eight per parameter.
  // XT_ADAMW_FOREACH=1 takes this path on the CPU too.
  static const bool foreachOnCpu = [] {
    const char* e = std::getenv("XT_ADAMW_FOREACH");
    return e && std::string(e) == "1";
  }();
  std::vector<bool> done(n, false);
  {
    std::vector<at::Tensor> fp, fg, fm, fv, fpDecay;
    std::vector<size_t> idx;
    for (size_t i = 0; i < n; i++) {
      const at::Tensor &p = ps[i], &g = gs[i], &m = ms[i], &v = vs[i];
      bool onDevice = !p.device().is_cpu() || foreachOnCpu;
      if (!onDevice || !exclusive[i] || p.scalar_type() != at::kFloat || g.scalar_type() != at::kFloat ||
          m.scalar_type() != at::kFloat || v.scalar_type() != at::kFloat || g.device() != p.device() ||
          m.device() != p.device() || v.device() != p.device() || !p.sizes().equals(g.sizes()) ||
          !p.sizes().equals(m.sizes()) || !p.sizes().equals(v.sizes()) || !owned(p) || !owned(m) || !owned(v) ||
          !separate(p, m, v))
        continue;
      fp.push_back(p);
      fg.push_back(g.contiguous());
      fm.push_back(m);
      fv.push_back(v);
      if (decay[i]) fpDecay.push_back(p);
      idx.push_back(i);
    }
    if (!fp.empty()) {
      at::_foreach_mul_(fm, b1);
      at::_foreach_add_(fm, fg, omb1);
      at::_foreach_mul_(fv, b2);
      at::_foreach_addcmul_(fv, fg, fg, omb2);
      auto denom = at::_foreach_sqrt(fv);
      at::_foreach_div_(denom, sbc2);
      at::_foreach_add_(denom, eps);
      if (!fpDecay.empty()) at::_foreach_mul_(fpDecay, dfac);
      at::_foreach_addcdiv_(fp, fm, denom, -step);
      for (size_t i : idx) {
        done[i] = true;
        g_rhsCache.erase(ps[i].unsafeGetTensorImpl());
        dropWeightCopies(ps[i]);
        for (uint32_t k = 0; k < 3; k++) result.Set(static_cast<uint32_t>(3 * i + k), Napi::Number::New(env, -1));
      }
    }
  }
  for (size_t i = 0; i < n; i++) {
    if (done[i]) continue;
    const at::Tensor &p = ps[i], &g = gs[i], &m = ms[i], &v = vs[i];
    if (!p.sizes().equals(g.sizes()) || !p.sizes().equals(m.sizes()) || !p.sizes().equals(v.sizes()))
      throw std::runtime_error("adamW: parameter " + std::to_string(i) + " has mismatched shapes");
    bool cpu = p.device().is_cpu() && p.scalar_type() == at::kFloat && g.scalar_type() == at::kFloat &&
               m.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat && g.device().is_cpu() &&
               m.device().is_cpu() && v.device().is_cpu();
    if (!cpu) {
      auto m2 = m * b1 + g * omb1;
      auto v2 = v * b2 + g.square() * omb2;
      auto base = decay[i] ? p * dfac : p;
      auto p2 = base - (m2 / (v2.sqrt() / sbc2 + eps)) * step;
      result.Set(3 * i, Napi::Number::New(env, store(p2)));
      result.Set(3 * i + 1, Napi::Number::New(env, store(m2)));
      result.Set(3 * i + 2, Napi::Number::New(env, store(v2)));
      continue;
    }
    bool inplace = exclusive[i] && owned(p) && owned(m) && owned(v) && p.storage().data() != m.storage().data() &&
                   p.storage().data() != v.storage().data() && m.storage().data() != v.storage().data();
    at::Tensor gc = g.contiguous();
    at::Tensor p2 = p, m2 = m, v2 = v, pc = p, mc = m, vc = v;
    if (!inplace) {
      pc = p.contiguous();
      mc = m.contiguous();
      vc = v.contiguous();
      p2 = at::empty_like(pc);
      m2 = at::empty_like(mc);
      v2 = at::empty_like(vc);
    } else {
      g_rhsCache.erase(p.unsafeGetTensorImpl());  // a dense copy of the old weights is stale now
      dropWeightCopies(p);
    }
    const float *pp = pc.data_ptr<float>(), *pg = gc.data_ptr<float>(), *pm = mc.data_ptr<float>(),
                *pv = vc.data_ptr<float>();
    float *op = p2.data_ptr<float>(), *om = m2.data_ptr<float>(), *ov = v2.data_ptr<float>();
    AdamWStep st{b1, b2, omb1, omb2, eps, step, sbc2, dfac, decay[i] != 0};
    at::parallel_for(0, pc.numel(), 16384, [&](int64_t lo, int64_t hi) {
      adamWRange(st, lo, hi, pp, pg, pm, pv, op, om, ov);
    });
    if (inplace) {
      for (uint32_t k = 0; k < 3; k++) result.Set(3 * i + k, Napi::Number::New(env, -1));
    } else {
      result.Set(3 * i, Napi::Number::New(env, store(p2)));
      result.Set(3 * i + 1, Napi::Number::New(env, store(m2)));
      result.Set(3 * i + 2, Napi::Number::New(env, store(v2)));
    }
  }
  return result;
}

// The library's generator (xoshiro128**, seeded state of four 32-bit words) filling a float32
// tensor with the exact stream the JavaScript `Rng` would draw: kind 0 uniform in [a, b), kind 1
// normal (Box-Muller, mean a, std b, keeping the spare value as the JavaScript one does).
// state: Float64Array [s0, s1, s2, s3, hasSpare, spare], read and advanced in place.
XT_FN(RandomFill) {
  int kind = num(info, 0);
  auto shape = ints(info[1]);
  double a = dbl(info, 2), b = dbl(info, 3);
  auto st = info[4].As<Napi::Float64Array>();
  if (st.ElementLength() != 6) throw std::runtime_error("randomFill: expected a state of 6 numbers");
  double* sd = st.Data();
  uint32_t s0 = static_cast<uint32_t>(sd[0]), s1 = static_cast<uint32_t>(sd[1]), s2 = static_cast<uint32_t>(sd[2]),
           s3 = static_cast<uint32_t>(sd[3]);
  bool hasSpare = sd[4] != 0;
  double spare = sd[5];
  auto rotl = [](uint32_t x, int k) { return (x << k) | (x >> (32 - k)); };
  auto next = [&]() {
    uint32_t r = rotl(s1 * 5u, 7) * 9u;
    uint32_t t = s1 << 9;
    s2 ^= s0;
    s3 ^= s1;
    s1 ^= s2;
    s0 ^= s3;
    s2 ^= t;
    s3 = rotl(s3, 11);
    return r;
  };
  auto unit = [&]() { return static_cast<double>(next()) / 4294967296.0; };
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(at::kFloat));
  float* out = t.data_ptr<float>();
  int64_t n = t.numel();
  if (kind == 0) {
    for (int64_t i = 0; i < n; i++) out[i] = static_cast<float>(a + (b - a) * unit());
  } else if (kind == 1) {
    const double twoPi = 2 * M_PI;
    for (int64_t i = 0; i < n; i++) {
      if (hasSpare) {
        hasSpare = false;
        out[i] = static_cast<float>(a + b * spare);
        continue;
      }
      double u = 0;
      while (u == 0) u = unit();
      double v = unit();
      double r = std::sqrt(-2 * std::log(u));
      spare = r * std::sin(twoPi * v);
      hasSpare = true;
      out[i] = static_cast<float>(a + b * r * std::cos(twoPi * v));
    }
  } else {
    throw std::runtime_error("randomFill: unknown kind " + std::to_string(kind));
  }
  sd[0] = s0;
  sd[1] = s1;
  sd[2] = s2;
  sd[3] = s3;
  sd[4] = hasSpare ? 1 : 0;
  sd[5] = hasSpare ? spare : 0;
  if (!g_device.is_cpu()) t = onDevice(t);
  return idv(info, t);
}

// One categorical draw per row, walking the cumulative mass in double precision exactly as the
// library's JavaScript sampler does. probs: [b, v] float32 (rows need not sum to 1; entries <= 0
// or NaN carry no mass), draws: b uniform numbers in [0, 1) -> int32 [b], the first index whose
// running mass exceeds draw * total (-1 for a row with no mass).
// The same walk as tensor ops on the device that holds probs, so that only the picked ids ever
// leave it: the positive mass summed in double by cumsum; the pick is the first position whose
// running sum exceeds u (its mass is positive: the sum only grows there), else the last positive
// position, else -1. A parallel cumsum may round differently from the sequential walk by an ulp.
at::Tensor sampleRowsOnDevice(const at::Tensor& probs, const double* draws) {
  int64_t b = probs.size(0), v = probs.size(1);
  at::Tensor p = probs.to(at::kDouble);
  at::Tensor positive = p.gt(0);
  at::Tensor mass = at::where(positive, p, at::zeros({}, p.options()));
  at::Tensor running = mass.cumsum(1);
  at::Tensor d = at::from_blob(const_cast<double*>(draws), {b, 1}, at::TensorOptions().dtype(at::kDouble)).clone();
  if (!p.device().is_cpu()) d = onDevice(d);
  at::Tensor u = d * running.narrow(1, v - 1, 1);
  at::Tensor first = at::searchsorted(running, u, /*out_int32=*/false, /*right=*/true).squeeze(1);
  at::Tensor pos = at::arange(v, at::TensorOptions().dtype(at::kLong).device(p.device()));
  at::Tensor last = at::where(positive, pos.unsqueeze(0), at::full({}, -1, pos.options())).amax(1);
  return at::where(first.lt(v), first, last).to(at::kInt);
}

// The indices j < n with row[j] > 0 (not NaN), in order, into idx; returns how many.
#if defined(__x86_64__)
__attribute__((target("avx2,bmi"))) int64_t positiveIndicesAvx2(const float* row, int64_t n, int32_t* idx) {
  const __m256 zero = _mm256_setzero_ps();
  int64_t m = 0, j = 0;
  for (; j + 8 <= n; j += 8) {
    unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + j), zero, _CMP_GT_OQ)));
    while (mask) {
      idx[m++] = static_cast<int32_t>(j + __builtin_ctz(mask));
      mask &= mask - 1;
    }
  }
  for (; j < n; j++)
    if (row[j] > 0) idx[m++] = static_cast<int32_t>(j);
  return m;
}
#endif
int64_t positiveIndices(const float* row, int64_t n, int32_t* idx) {
#if defined(__x86_64__)
  if (g_avx2) return positiveIndicesAvx2(row, n, idx);
#endif
  int64_t m = 0;
  for (int64_t j = 0; j < n; j++)
    if (row[j] > 0) idx[m++] = static_cast<int32_t>(j);
  return m;
}

XT_FN(SampleRows) {
  at::Tensor p = get(info[0]);
  if (p.dim() != 2) throw std::runtime_error("sampleRows: expected probs [b, v]");
  auto draws = info[1].As<Napi::Float64Array>();
  int64_t b = p.size(0), v = p.size(1);
  if (static_cast<int64_t>(draws.ElementLength()) != b) throw std::runtime_error("sampleRows: expected one draw per row");
  bool tensorWalk = info.Length() > 2 && flag(info, 2);
  if ((!p.device().is_cpu() || tensorWalk) && v > 0) return idv(info, sampleRowsOnDevice(p, draws.Data()));
  p = p.to(at::kCPU).to(at::kFloat).contiguous();
  at::Tensor out = at::empty({b}, at::TensorOptions().dtype(at::kInt));
  const float* pp = p.data_ptr<float>();
  int32_t* po = out.data_ptr<int32_t>();
  // the positive entries' indices first (after a top-k or top-p filter, a small part of the row):
  // the sums below then add exactly the terms, in exactly the order, of a walk over the whole row
  static thread_local std::vector<int32_t> pos;
  pos.resize(v);
  for (int64_t i = 0; i < b; i++) {
    const float* row = pp + i * v;
    const int64_t n = positiveIndices(row, v, pos.data());
    double total = 0;
    for (int64_t q = 0; q < n; q++) total += row[pos[q]];
    double u = draws.Data()[i] * total;
    double acc = 0;
    int64_t pick = -1;
    for (int64_t q = 0; q < n; q++) {
      acc += row[pos[q]];
      pick = pos[q];
      if (acc > u) break;
    }
    po[i] = static_cast<int32_t>(pick);
  }
  if (!g_device.is_cpu()) out = out.to(g_device);
  return idv(info, out);
}

// setPrecision("fp32" | "bf16") -> the previous setting
XT_FN(SetPrecision) {
  std::string p = info[0].As<Napi::String>().Utf8Value();
  std::string before = g_bf16 ? "bf16" : "fp32";
  if (p == "bf16") g_bf16 = true;
  else if (p == "fp32") g_bf16 = false;
  else throw std::runtime_error("setPrecision: expected fp32 or bf16, got " + p);
  return Napi::String::New(info.Env(), before);
}

// The CUDA device in use, through the driver library (libcuda.so.1, present wherever a CUDA
// LibTorch runs; no CUDA headers are needed): {name, memoryUsedBytes, memoryTotalBytes}, or null on
// the CPU. memoryUsedBytes is the device's, every process included.
XT_FN(DeviceInfo) {
  Napi::Env env = info.Env();
  if (!g_device.is_cuda()) return env.Null();
  auto out = Napi::Object::New(env);
  out.Set("index", static_cast<double>(g_device.index() < 0 ? 0 : g_device.index()));
  void* lib = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);
  if (!lib) lib = dlopen("libcuda.so.1", RTLD_LAZY);
  if (!lib) return out;
  using GetFn = int (*)(int*, int);
  using NameFn = int (*)(char*, int, int);
  using TotalFn = int (*)(size_t*, int);
  using MemFn = int (*)(size_t*, size_t*);
  auto deviceGet = reinterpret_cast<GetFn>(dlsym(lib, "cuDeviceGet"));
  auto getName = reinterpret_cast<NameFn>(dlsym(lib, "cuDeviceGetName"));
  auto totalMem = reinterpret_cast<TotalFn>(dlsym(lib, "cuDeviceTotalMem_v2"));
  auto memInfo = reinterpret_cast<MemFn>(dlsym(lib, "cuMemGetInfo_v2"));
  int dev = 0;
  if (!deviceGet || deviceGet(&dev, g_device.index() < 0 ? 0 : g_device.index()) != 0) return out;
  char name[256] = {0};
  if (getName && getName(name, sizeof(name) - 1, dev) == 0) out.Set("name", std::string(name));
  size_t total = 0, free = 0, total2 = 0;
  if (totalMem && totalMem(&total, dev) == 0) out.Set("memoryTotalBytes", static_cast<double>(total));
  // needs the device's context current on this thread, which LibTorch's first CUDA call made
  if (memInfo && memInfo(&free, &total2) == 0) out.Set("memoryUsedBytes", static_cast<double>(total2 - free));
  return out;
}

XT_FN(HasSdpa) {
#ifdef XT_SDPA
  return Napi::Boolean::New(info.Env(), true);
#else
  return Napi::Boolean::New(info.Env(), false);
#endif
}

// The tensor registry and the shared meta array are the process's: two JavaScript threads using
// them would corrupt each other's tensors, so the addon serves the first thread that loads it and
// refuses others until that thread ends.
napi_env g_owner = nullptr;

Napi::Object InitModule(Napi::Env env, Napi::Object exports) {
  if (g_owner != nullptr && g_owner != static_cast<napi_env>(env))
    throw Napi::Error::New(env,
                           "xt_torch: the addon is in use by another JavaScript thread of this process (one "
                           "thread per process can use the torch backend)");
  if (g_owner == nullptr) {
    g_owner = env;
    env.AddCleanupHook([]() {
      g_owner = nullptr;
      g_meta = nullptr;
      // released while the environment lives: the static's destructor at exit would otherwise
      // delete a reference of an environment that is gone
      g_metaRef.Reset();
    });
  }
#define X(n, f) exports.Set(n, Napi::Function::New(env, f, n))
  X("init", Init);
  X("fromData", FromData);
  X("toData", ToData);
  X("free", Free);
  X("freeList", FreeList);
  X("count", Count);
  X("bytes", Bytes);
  X("storageUseCount", StorageUseCount);
  X("storages", Storages);
  X("unary", Unary);
  X("binary", Binary);
  X("cast", Cast);
  X("where", Where);
  X("clip", Clip);
  X("addN", AddN);
  X("reshape", Reshape);
  X("transpose", Transpose);
  X("broadcastTo", BroadcastTo);
  X("contiguous", Contiguous);
  X("concat", Concat);
  X("stack", Stack);
  X("unstack", Unstack);
  X("split", Split);
  X("slice", Slice);
  X("stridedSlice", StridedSlice);
  X("pad", Pad);
  X("mirrorPad", MirrorPad);
  X("tile", Tile);
  X("reverse", Reverse);
  X("gather", Gather);
  X("gatherNd", GatherNd);
  X("scatterNd", ScatterNd);
  X("segmentSum", SegmentSum);
  X("oneHot", OneHot);
  X("topk", TopK);
  X("cumulative", Cumulative);
  X("fill", Fill);
  X("fillLike", FillLike);
  X("multinomial", Multinomial);
  X("reduce", Reduce);
  X("argReduce", ArgReduce);
  X("matmul", MatMul);
  X("cpuCache", CpuCache);
  X("helpers", Helpers);
  X("setHelpersOnly", SetHelpersOnly);
  X("setSmallGemvRows", SetSmallGemvRows);
  X("setSmallOps", SetSmallOps);
  X("topKFilter", TopKFilter);
  X("topPFilter", TopPFilter);
  X("layerNorm", LayerNorm);
  X("layerNormGrad", LayerNormGrad);
  X("geluGrad", GeluGrad);
  X("rotary", Rotary);
  X("softmax", Softmax);
  X("einsum", Einsum);
  X("conv2d", Conv2D);
  X("attention", Attention);
  X("attentionGrad", AttentionGrad);
  X("hasSdpa", HasSdpa);
  X("setPrecision", SetPrecision);
  X("deviceInfo", DeviceInfo);
  X("crossEntropy", CrossEntropy);
  X("crossEntropyGrad", CrossEntropyGrad);
  X("adamW", AdamW);
  X("randomFill", RandomFill);
  X("sampleRows", SampleRows);
  X("cachedAttention", CachedAttention);
  X("cachedAttentionRows", CachedAttentionRows);
#undef X
  return exports;
}

}  // namespace

NODE_API_MODULE(xt_torch, InitModule)
