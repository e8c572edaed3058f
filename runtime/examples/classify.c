/* Run an exported mpismoe-edge model (out/onnx/model.onnx) from C with the ONNX Runtime C API.
 *
 * Not built in CI. Tokenization is up to the app (e.g. a tokenizers binding reading
 * out/tokenizer.json); this example takes already tokenized ids on the command line, with the
 * special tokens included, as `mpismoe_edge.runtime` would produce them for one text:
 *
 *   cc -O2 -o classify classify.c -I$ORT/include -L$ORT/lib -lonnxruntime
 *   ./classify out/onnx/model.onnx 101 2307 3042 102
 *
 * It feeds input_ids, attention_mask (all ones) and token_type_ids (all zeros), batch of one,
 * for whichever of these the model declares, and prints the logits and the argmax index
 * (map it to a name with the "labels" list in out/manifest.json).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "onnxruntime_c_api.h"

static const OrtApi *ort;

static void check(OrtStatus *status, const char *what) {
  if (status != NULL) {
    fprintf(stderr, "error: %s: %s\n", what, ort->GetErrorMessage(status));
    ort->ReleaseStatus(status);
    exit(2);
  }
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s model.onnx TOKEN_ID [TOKEN_ID ...]\n", argv[0]);
    return 2;
  }
  ort = OrtGetApiBase()->GetApi(ORT_API_VERSION);
  if (ort == NULL) {
    fprintf(stderr, "error: this onnxruntime library is older than the header\n");
    return 2;
  }

  const int64_t seq = argc - 2;
  int64_t *ids = malloc(seq * sizeof(int64_t)), *mask = malloc(seq * sizeof(int64_t)),
          *types = calloc(seq, sizeof(int64_t));
  for (int64_t i = 0; i < seq; i++) {
    char *end;
    ids[i] = strtoll(argv[i + 2], &end, 10);
    if (*end != '\0' || ids[i] < 0) {
      fprintf(stderr, "error: token id %s is not a non-negative integer\n", argv[i + 2]);
      return 2;
    }
    mask[i] = 1;
  }

  OrtEnv *env;
  OrtSessionOptions *opts;
  OrtSession *session;
  check(ort->CreateEnv(ORT_LOGGING_LEVEL_WARNING, "mpismoe-edge", &env), "CreateEnv");
  check(ort->CreateSessionOptions(&opts), "CreateSessionOptions");
  check(ort->SetSessionGraphOptimizationLevel(opts, ORT_ENABLE_ALL), "SetSessionGraphOptimizationLevel");
  check(ort->SetIntraOpNumThreads(opts, 1), "SetIntraOpNumThreads");
  check(ort->CreateSession(env, argv[1], opts, &session), "CreateSession");

  OrtMemoryInfo *cpu;
  OrtAllocator *alloc;
  check(ort->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &cpu), "CreateCpuMemoryInfo");
  check(ort->GetAllocatorWithDefaultOptions(&alloc), "GetAllocatorWithDefaultOptions");

  /* Bind each model input by name; the exporter may drop an unused one (e.g. token_type_ids). */
  size_t n_inputs;
  check(ort->SessionGetInputCount(session, &n_inputs), "SessionGetInputCount");
  char **names = calloc(n_inputs, sizeof(char *));
  OrtValue **inputs = calloc(n_inputs, sizeof(OrtValue *));
  const int64_t shape[2] = {1, seq};
  for (size_t k = 0; k < n_inputs; k++) {
    check(ort->SessionGetInputName(session, k, alloc, &names[k]), "SessionGetInputName");
    int64_t *data = !strcmp(names[k], "input_ids")        ? ids
                    : !strcmp(names[k], "attention_mask") ? mask
                    : !strcmp(names[k], "token_type_ids") ? types
                                                          : NULL;
    if (data == NULL) {
      fprintf(stderr, "error: unexpected model input %s\n", names[k]);
      return 2;
    }
    check(ort->CreateTensorWithDataAsOrtValue(cpu, data, seq * sizeof(int64_t), shape, 2,
                                              ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, &inputs[k]),
          "CreateTensorWithDataAsOrtValue");
  }

  const char *output_names[1] = {"logits"};
  OrtValue *logits = NULL;
  check(ort->Run(session, NULL, (const char *const *)names, (const OrtValue *const *)inputs, n_inputs,
                 output_names, 1, &logits),
        "Run");

  OrtTensorTypeAndShapeInfo *info;
  size_t rank;
  int64_t dims[2] = {1, 1};
  check(ort->GetTensorTypeAndShape(logits, &info), "GetTensorTypeAndShape");
  check(ort->GetDimensionsCount(info, &rank), "GetDimensionsCount");
  check(ort->GetDimensions(info, dims, rank < 2 ? rank : 2), "GetDimensions");
  ort->ReleaseTensorTypeAndShapeInfo(info);
  float *out;
  check(ort->GetTensorMutableData(logits, (void **)&out), "GetTensorMutableData");

  const int64_t classes = rank >= 2 ? dims[1] : 1;
  int64_t best = 0;
  printf("logits:");
  for (int64_t c = 0; c < classes; c++) {
    printf(" %.6f", out[c]);
    if (out[c] > out[best]) best = c;
  }
  printf("\nargmax: %lld\n", (long long)best);

  ort->ReleaseValue(logits);
  for (size_t k = 0; k < n_inputs; k++) {
    ort->ReleaseValue(inputs[k]);
    check(ort->AllocatorFree(alloc, names[k]), "AllocatorFree");
  }
  free(names);
  free(inputs);
  ort->ReleaseMemoryInfo(cpu);
  ort->ReleaseSession(session);
  ort->ReleaseSessionOptions(opts);
  ort->ReleaseEnv(env);
  free(ids);
  free(mask);
  free(types);
  return 0;
}
