{
  "targets": [
    {
      "target_name": "xt_torch",
      "sources": ["native/xt_torch.cc"],
      "include_dirs": [
        "<!(node -p \"require('node-addon-api').include_dir\")",
        "<!@(node scripts/build-native.mjs --print include)"
      ],
      "libraries": ["<!@(node scripts/build-native.mjs --print libs)"],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS", "<!@(node scripts/build-native.mjs --print defines)"],
      "cflags!": ["-fno-exceptions", "-fno-rtti", "-O3"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti", "-O3"],
      "cflags_cc": ["<!@(node scripts/build-native.mjs --print cflags)", "-O2", "-fexceptions", "-frtti", "-Wno-unused-parameter", "-Wno-deprecated-declarations"]
    }
  ]
}
