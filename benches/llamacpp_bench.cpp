// llama.cpp side of `ds4 bench`: the same prompt, the same frontiers, the same CSV columns.
//
// usage: llamacpp_bench MODEL.gguf CTX_LIST(comma separated) N_GEN N_THREADS [CSV_OUT]
//
// For each frontier N: a fresh context of N + N_GEN cells, prefill the N prompt tokens
// id_i = (i * 7919 + 13) mod V (the ids `ds4 bench` feeds) in batches of 256 (ds4-rs's
// prefill chunk), then N_GEN greedy single-token decode steps. llama.cpp's defaults are
// kept otherwise (F16 KV cache, flash attention "auto", no mmap changes): its production
// configuration. Built by benches/llamacpp_side_by_side.sh against libllama from the
// llama-cpp-python 0.3.36 sdist.
#include "llama.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

static double now_s() {
    using namespace std::chrono;
    return duration<double>(steady_clock::now().time_since_epoch()).count();
}

static void decode(llama_context * ctx, const llama_token * toks, int n, int pos0) {
    llama_batch b = llama_batch_init(n, 0, 1);
    b.n_tokens = n;
    for (int i = 0; i < n; i++) {
        b.token[i] = toks[i]; b.pos[i] = pos0 + i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0;
        b.logits[i] = i + 1 == n;
    }
    if (llama_decode(ctx, b) != 0) { fprintf(stderr, "llama_decode failed\n"); exit(1); }
    llama_batch_free(b);
}

int main(int argc, char ** argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s model.gguf ctx,list n_gen n_threads [out.csv]\n", argv[0]);
        return 2;
    }
    std::vector<int> ctxs;
    { std::stringstream ss(argv[2]); std::string t; while (std::getline(ss, t, ',')) ctxs.push_back(atoi(t.c_str())); }
    const int n_gen = atoi(argv[3]), n_threads = atoi(argv[4]);
    FILE * csv = argc > 5 ? fopen(argv[5], "w") : nullptr;
    if (csv) fprintf(csv, "engine,model,threads,ctx,prefill_s,prefill_tps,gen,decode_s,decode_tps\n");
    std::string name = argv[1];
    name = name.substr(name.find_last_of('/') + 1);

    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    const double t_load = now_s();
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "model load failed\n"); return 1; }
    fprintf(stderr, "loaded in %.2f s\n", now_s() - t_load);
    const int nv = llama_vocab_n_tokens(llama_model_get_vocab(model));
    printf("%8s %10s %12s %6s %10s %12s\n", "ctx", "prefill_s", "prefill_t/s", "gen", "decode_s", "decode_t/s");
    for (int n : ctxs) {
        llama_context_params cp = llama_context_default_params();
        cp.n_ctx = n + n_gen; cp.n_batch = 256; cp.n_ubatch = 256; cp.n_seq_max = 1;
        cp.n_threads = n_threads; cp.n_threads_batch = n_threads; cp.no_perf = true;
        llama_context * ctx = llama_init_from_model(model, cp);
        if (!ctx) { fprintf(stderr, "context creation failed\n"); return 1; }
        std::vector<llama_token> toks(n);
        for (int i = 0; i < n; i++) toks[i] = (llama_token) (((long long) i * 7919 + 13) % nv);
        double t = now_s();
        for (int i = 0; i < n; i += 256) decode(ctx, toks.data() + i, std::min(256, n - i), i);
        const double prefill_s = now_s() - t;
        t = now_s();
        for (int g = 0; g < n_gen; g++) {
            const float * lg = llama_get_logits_ith(ctx, -1);
            int best = 0;
            for (int i = 1; i < nv; i++) if (lg[i] > lg[best]) best = i;
            llama_token tok = best;
            decode(ctx, &tok, 1, n + g);
        }
        const double decode_s = now_s() - t;
        printf("%8d %10.3f %12.2f %6d %10.3f %12.2f\n", n, prefill_s, n / prefill_s, n_gen, decode_s, n_gen / decode_s);
        fflush(stdout);
        if (csv) fprintf(csv, "llama.cpp,%s,%d,%d,%.4f,%.3f,%d,%.4f,%.3f\n", name.c_str(), n_threads, n, prefill_s,
                         n / prefill_s, n_gen, decode_s, n_gen / decode_s);
        llama_free(ctx);
    }
    if (csv) fclose(csv);
    llama_model_free(model);
    return 0;
}
