package libxl

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/xlsnap/xlsnap/errdefs"
)

// FuzzReadXLHeader: any bytes give a header or a typed refusal, never a
// panic or an allocation the header dictates; a header xlsnap wrote reads
// back its configuration.
func FuzzReadXLHeader(f *testing.F) {
	var good bytes.Buffer
	writeXLHeader(&good, `{"c_info":{"name":"vm"}}`)
	f.Add(good.Bytes(), "")
	f.Add(good.Bytes()[:20], "")
	f.Add([]byte{}, `{"b_info":{}}`)
	f.Fuzz(func(t *testing.T, data []byte, config string) {
		_, _, err := readXLHeader(bytes.NewReader(data))
		if err != nil && !errors.Is(err, errNotXLImage) && !errors.Is(err, errdefs.ErrUnsupported) {
			t.Fatalf("untyped refusal: %v", err)
		}
		if strings.ContainsRune(config, 0) || len(config) > 1<<16 {
			return
		}
		var buf bytes.Buffer
		if err := writeXLHeader(&buf, config); err != nil {
			t.Fatal(err)
		}
		buf.Write(data) // the stream follows, untouched
		v, got, err := readXLHeader(&buf)
		if err != nil || v != 2 || got != config {
			t.Fatalf("round trip of %q: version %d, %q, %v", config, v, got, err)
		}
		if !bytes.Equal(buf.Bytes(), data) {
			t.Fatal("the header read past itself into the stream")
		}
	})
}
