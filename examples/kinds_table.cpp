// Placeholder: will print, for each attention kind, the cache factors and bytes per token.
#include <tpa/tpa.hpp>

#include <cstdio>

int main() {
  std::printf("tpa kinds_table: placeholder (the per-kind table is not written yet)\n");
  return 0;
}
