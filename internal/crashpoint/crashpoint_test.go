package crashpoint

import "testing"

func TestDo(t *testing.T) {
	var got []string
	stop := Do("op/step", func() { got = append(got, "ran") })
	Hit("op/other")
	Hit("op/step")
	stop()
	Hit("op/step")
	if len(got) != 1 {
		t.Fatalf("the action ran %d times, want once (at op/step, before stop)", len(got))
	}
}

func TestCatch(t *testing.T) {
	crashed, err := Catch("op/step", func() error { Hit("op/step"); t.Fatal("ran past the point"); return nil })
	if !crashed || err != nil {
		t.Fatalf("Catch = %v, %v; want crashed", crashed, err)
	}
	crashed, err = Catch("op/step", func() error { Hit("op/other"); return nil })
	if crashed || err != nil {
		t.Fatalf("Catch = %v, %v; want the op to return", crashed, err)
	}
}
